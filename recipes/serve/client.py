"""Call a running lora-serve with the official ``openai`` client: base model, an adapter, streaming, chat,
and adapter hot-loading (the endpoints vLLM names, which the openai client has no method for).

    python recipes/serve/client.py --url http://127.0.0.1:8000 --api-key "$KEY"
"""

from __future__ import annotations

import argparse

import httpx
import openai


def main() -> None:
    """Run each call once and print what came back."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default="none", help="the server's --api-key (any string if it has none)")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key)

    cards = {m.id: m for m in client.models.list()}  # `root` (an extension) is where each was loaded from
    base, *adapters = cards
    print(f"base model {base!r}, {len(adapters)} adapters: {adapters[:5]}")

    for model in [base, *adapters[:2]]:
        answer = client.completions.create(model=model, prompt="The capital of France is", max_tokens=12,
                                           temperature=0)
        print(f"{model}: {answer.choices[0].text!r} ({answer.usage.completion_tokens} tokens)")

    print("streamed chat: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=adapters[0] if adapters else base, stream=True, max_tokens=40,
        messages=[{"role": "user", "content": "Name three colours."}],
    )
    for chunk in stream:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()

    # Hot-loading: the path must lie under the server's --adapter-root (relative paths are taken from it).
    if adapters:
        headers = {"Authorization": f"Bearer {args.api_key}"}
        name, path = adapters[0], cards[adapters[0]].root
        unloaded = httpx.post(f"{args.url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=headers)
        print("unload:", unloaded.status_code, unloaded.json())
        loaded = httpx.post(f"{args.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path},
                            headers=headers)
        print("load:", loaded.status_code, loaded.json())


if __name__ == "__main__":
    main()
