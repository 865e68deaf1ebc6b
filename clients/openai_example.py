"""Talk to diffpo-serve with the official ``openai`` client: completion, chat, streaming, diffusion extras.

    diffpo-serve &                                   # the bundled model on http://127.0.0.1:8000
    python clients/openai_example.py                 # or: --base-url http://host:port/v1 --api-key KEY

The base URL comes from ``--base-url``, else ``OPENAI_BASE_URL``, else ``http://127.0.0.1:8000/v1``;
the key from ``--api-key``, else ``DIFFPO_API_KEY``, else ``OPENAI_API_KEY`` (any string works when
the server has no key). The diffusion extras (``sampler``, ``threshold``, ``block_length``,
``steps``) are not OpenAI parameters, so they travel in ``extra_body``; each choice reports the
forward passes it took (``nfe``) and the threshold it used, and ``usage.nfe`` sums them.
"""

from __future__ import annotations

import argparse
import os

from openai import OpenAI

SUDOKU = "sudoku 3020213443020243"
COUNTDOWN = "countdown 11,54,29=94"  # examples the bundled model solves (its model card lists them)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"))
    parser.add_argument("--api-key", default=os.environ.get("DIFFPO_API_KEY") or os.environ.get("OPENAI_API_KEY")
                        or "no-key")
    parser.add_argument("--model", default=None, help="default: the first model the server lists")
    args = parser.parse_args(argv)

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    print(f"model: {model}")

    # 1. a plain completion (the model's default sampler and length)
    r = client.completions.create(model=model, prompt=SUDOKU, max_tokens=16, temperature=0)
    c = r.choices[0]
    print(f"completion: {c.text!r} finish={c.finish_reason} nfe={c.nfe} usage={r.usage.completion_tokens} tokens")

    # 2. chat: without a chat template the prompt is the last user message
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": COUNTDOWN}])
    print(f"chat: {r.choices[0].message.content!r}")

    # 3. streaming: text arrives block by block; the last chunk carries usage
    print("stream: ", end="", flush=True)
    stream = client.completions.create(model=model, prompt=COUNTDOWN, max_tokens=16, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"block_length": 4})
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].text, end="", flush=True)
        elif chunk.usage:
            print(f"\n  usage: {chunk.usage.completion_tokens} tokens, nfe={chunk.usage.nfe}")

    # 4. diffusion extras: the entropy-bounded sampler spends fewer forward passes than `steps`
    for extra in ({"sampler": "steps"}, {"sampler": "eb", "threshold": 0.3, "block_length": 8},
                  {"sampler": "confidence", "threshold": 0.9}):
        r = client.completions.create(model=model, prompt=SUDOKU, max_tokens=16, extra_body=extra)
        c = r.choices[0]
        print(f"{extra}: {c.text!r} nfe={c.nfe} threshold={c.threshold}")

    # 5. several samples at once: n rows decoded together, seed + i for choice i
    r = client.completions.create(model=model, prompt=COUNTDOWN, n=3, temperature=1.0, seed=7,
                                  extra_body={"sampler": "eb"})
    for c in r.choices:
        print(f"sample {c.index}: {c.text!r}")


if __name__ == "__main__":
    main()
