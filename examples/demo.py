"""`make run`: an embedded kvweave cluster (Redis, 2 workers, the router) on this machine, a short demo
through the kvweave SDK (a streamed chat, a completion, two prompts sharing documents as reusable
chunks) and through the OpenAI API with the official
`openai` client (a chat completion, then the same streamed), a short `kvweave loadgen` run (RAG
questions whose passages recur in other orders, as reusable chunks) with its summary, then
everything stops.
"""
from __future__ import annotations

import argparse
import sys
import time

from openai import OpenAI

import kvweave
from cli.main import main as kvweave_main
from controlplane.cluster import LocalCluster
from controlplane.cluster_config import ClusterError

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PRIMES = [{"role": "user", "content": "Name three prime numbers."}]
HAIKU = [{"role": "user", "content": "Write a haiku about the sea."}]
PROMPT = "The three primary colors are"
DOCS = ["Passage: The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889 for the World's Fair.\n",
        "Passage: Mount Everest, on the border of Nepal and China, is Earth's highest mountain above sea level.\n"]
RAG_INSTRUCTION = "Answer the question from the passages.\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m", help="model of the workers (default: smollm2-135m)")
    p.add_argument("--workers", type=int, default=2, help="number of workers (default: 2)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per answer (default: 48)")
    p.add_argument("--kv-cache-gb", type=float, default=0.25, help="KV cache per worker (default: 0.25)")
    p.add_argument("--loadgen-requests", type=int, default=24,
                   help="requests of the closing loadgen run, 0 to skip it (default: 24)")
    return p.parse_args()


def sdk_demo(target: str, max_tokens: int) -> None:
    with kvweave.Client(target, timeout=120) as client:
        print(f"\n[SDK] streamed chat: {QUESTION[0]['content']}\n  ", end="")
        for delta in client.generate(messages=QUESTION, max_tokens=max_tokens, temperature=0):
            print(delta.text, end="", flush=True)
            if delta.finished:
                print(f"\n  ({delta.finish_reason}, {delta.usage.completion_tokens} tokens, worker {delta.worker_id})")
        completion = client.complete(PROMPT, max_tokens=24, temperature=0)
        print(f"\n[SDK] completion: {PROMPT!r}\n  {completion.text.strip()!r}\n"
              f"  ({completion.finish_reason}, worker {completion.worker_id})")


def rag_demo(target: str) -> None:
    """The same two documents in two prompts, in a different order: the second reuses their KV."""
    with kvweave.Client(target, timeout=120) as client:
        for docs, question in ((DOCS, "When was the Eiffel Tower completed?"),
                               (DOCS[::-1], "Where is Mount Everest?")):
            segments = [RAG_INSTRUCTION, *(kvweave.Segment(d, reusable=True) for d in docs),
                        f"Question: {question}\nAnswer:"]
            c = client.complete(None, segments=segments, max_tokens=16, temperature=0)
            u = c.usage
            print(f"\n[SDK] documents as reusable chunks: {question}\n  {c.text.strip()!r}\n"
                  f"  ({u.prompt_tokens} prompt tokens: {u.cached_tokens} from the prefix cache, "
                  f"{u.chunk_reused_tokens} from chunk-caches ({u.recomputed_tokens} of them recomputed); "
                  f"worker {c.worker_id})")


def openai_demo(http_url: str, model: str, max_tokens: int) -> None:
    client = OpenAI(base_url=f"{http_url}/v1", api_key="unused", timeout=120)
    reply = client.chat.completions.create(model=model, messages=PRIMES, max_tokens=max_tokens, temperature=0)
    print(f"\n[OpenAI] chat completion: {PRIMES[0]['content']}\n  {reply.choices[0].message.content.strip()}\n"
          f"  ({reply.choices[0].finish_reason}, {reply.usage.completion_tokens} tokens)")
    print(f"\n[OpenAI] streamed chat completion: {HAIKU[0]['content']}\n  ", end="")
    stream = client.chat.completions.create(model=model, messages=HAIKU, max_tokens=max_tokens, temperature=0.7,
                                            seed=7, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content.replace("\n", "\n  "), end="", flush=True)
    print()


def loadgen_demo(target: str, num_requests: int) -> int:
    """`kvweave loadgen` against the cluster: popular MuSiQue questions, passages shuffled per request."""
    argv = ["loadgen", "--url", target, "--workload", "rag", "--num-docs", "3", "--max-doc-words", "60",
            "--shuffle-docs", "--popularity-skew", "1.5", "--output-len", "8", "--num-requests", str(num_requests),
            "--request-rate", "4", "--max-concurrency", "4", "--no-progress"]
    print(f"\n[loadgen] kvweave {' '.join(argv)}", flush=True)
    return kvweave_main(argv)


def main() -> int:
    args = parse_args()
    start = time.monotonic()
    # One torch thread per worker: the workers share the machine's cores.
    engine_args = {"kv_cache_gb": args.kv_cache_gb, "num_threads": 1, "dram_cache_gb": args.kv_cache_gb}
    print(f"starting a cluster: Redis, {args.workers} workers ({args.model}), the router ...", flush=True)
    try:
        with LocalCluster(workers=args.workers, model=args.model, engine_args=engine_args) as cluster:
            print(f"ready in {time.monotonic() - start:.0f} s: grpc {cluster.grpc_target}, "
                  f"http {cluster.http_url}/v1, redis {cluster.redis_url}")
            for worker_id, address in cluster.worker_addresses.items():
                print(f"  {worker_id} at {address}")
            sdk_demo(cluster.grpc_target, args.max_tokens)
            rag_demo(cluster.grpc_target)
            with kvweave.Client(cluster.grpc_target) as client:
                model = client.list_models()[0].id
            openai_demo(cluster.http_url, model, args.max_tokens)
            if args.loadgen_requests and loadgen_demo(cluster.grpc_target, args.loadgen_requests) != 0:
                return 1
            print("\nstopping the cluster ...", flush=True)
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
