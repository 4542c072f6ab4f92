"""Stage a request's image embeddings before it enters the engine: cached here, from a peer, or encoded.

Runs in the worker's event loop for each request with images (worker/kv_prefetch.py calls it first,
before the KV is staged), so the engine thread never encodes. For each image, by its embedding key
(`kvstore.keys.embedding_key`: the image's content hash, model, namespace, cluster salt):
1. this worker's caches: the host tier's entries (kvstore/embeddings.py), then the encoder's
   in-memory LRU (worker/multimodal.py);
2. the images whose holder the router named (`Request.embedding_holders`: the encode worker that
   just made the embedding, or a worker the KV index lists): each holder sends the entries of the
   images it holds in one transfer (kvstore/transfer_client.py: the same path as blocks and
   chunk-caches), even a holder not yet in this worker's peer list (refreshed each heartbeat) and
   with peer fetches off (`--peer-fetch false`), as a prefill handoff is pulled from where the
   router says;
3. the images still missing, when this worker fetches from peers: the KV index says which peers
   hold every entry of one (one Redis round trip for all of them); each chosen peer sends its
   images' entries in one transfer;
4. the rest is encoded here, in a thread.
Whatever did not come from the host tier is stored there (the worker's KV events then publish it
to the index), so an embedding computed or fetched anywhere is found by every worker after it.
A lookup or transfer that fails only means the image is encoded here; an image that cannot be
decoded fails its request (InvalidRequestError). Where each image came from goes to the request
(`Request.image_sources`, reported in its usage) and to the worker's metrics.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence

import torch

from kvstore.embeddings import embedding_keys, load_embedding, store_embedding, unpack_embedding
from kvstore.index import CHUNK_MEDIUMS, KVIndex
from kvstore.keys import embedding_key
from kvstore.transfer_client import TransferClient, TransferError
from kvweave.images import ImageInput, check_image_count, inspect_image
from worker.metrics import WorkerMetrics
from worker.request import Request

logger = logging.getLogger(__name__)


def encoder_problem(engine) -> str | None:
    """Why an engine cannot serve as an encode worker (None: it can): it needs a vision model, and a
    host tier to keep the embeddings it makes in for its peers."""
    if engine.images is None:
        return f"model {engine.model_name} takes no images: an encode worker needs a vision-language model"
    if engine.store is None:
        return "an encode worker keeps the embeddings it makes in a host tier: give it --dram-cache-gb"
    return None


class EmbeddingStager:
    def __init__(self, engine, index: KVIndex | None = None, peers: Callable[[], dict[str, str]] | None = None,
                 client: TransferClient | None = None, timeout_s: float = 5.0,
                 metrics: WorkerMetrics | None = None) -> None:
        """`engine`: an LLMEngine of a vision-language model; `peers()`: worker id -> address."""
        self.engine, self.encoder = engine, engine.images
        self.index, self.peers = index, peers
        self.client = client or TransferClient()
        self.timeout_s = timeout_s
        self.metrics = metrics

    def check_images(self, data: list[bytes]) -> list[ImageInput]:
        """The images of an Encode call, checked (format, size, count); InvalidRequestError naming
        the first bad one."""
        check_image_count(len(data), self.encoder.limits)
        return [inspect_image(d, f"image {k}", self.encoder.limits) for k, d in enumerate(data)]

    def cache_extra(self, namespace: str) -> bytes:
        return self.engine.cache_extra(namespace)

    async def stage(self, req: Request) -> None:
        """Set the request's `mm_inputs` (and `image_sources`) from its pending images."""
        pending = req.images
        embeds, sources = await self.embed(pending.images, req.cache_extra, req.req_id,
                                           holders=req.embedding_holders)
        req.mm_inputs = pending.assemble(embeds)
        req.image_sources = dict(Counter(sources))

    async def embed(self, images: list[ImageInput], extra: bytes, what: str = "", from_peers: bool = True,
                    holders: Sequence[tuple[str, str]] = ()) -> tuple[list[torch.Tensor], list[str]]:
        """Each image's embeddings and where they came from ("cached", "fetched", "encoded").
        `holders`: none, or per image the (worker id, address) the router says holds it (see
        `_from_holders`); `from_peers`: also look in the KV index for peers that hold them."""
        keys = [embedding_key(img.hash, extra) for img in images]
        embeds, sources = await asyncio.to_thread(self._local, images, keys)
        if holders:
            await self._fetch_missing(embeds, sources, what, self._from_holders, images, keys, holders)
        if from_peers and self.index is not None and self.peers is not None:
            await self._fetch_missing(embeds, sources, what, self._from_peers, images, keys)
        todo = [i for i, e in enumerate(embeds) if e is None]
        if todo:
            for i, e in zip(todo, await asyncio.to_thread(self._encode, [images[i] for i in todo],
                                                          [keys[i] for i in todo])):
                embeds[i], sources[i] = e, "encoded"
        keep = [i for i, s in enumerate(sources) if s != "stored"]
        if keep:
            await asyncio.to_thread(self._keep, [images[i] for i in keep], [keys[i] for i in keep],
                                    [embeds[i] for i in keep])
        return embeds, ["cached" if s in ("stored", "lru") else s for s in sources]

    async def _fetch_missing(self, embeds: list, sources: list[str], what: str, fetch, images: list[ImageInput],
                             keys: list[bytes], *args) -> None:
        """Fill the images still missing from `fetch(images, keys, missing, *args, what)`."""
        missing = [i for i, e in enumerate(embeds) if e is None]
        if not missing:
            return
        try:
            for i, e in (await fetch(images, keys, missing, *args, what)).items():
                embeds[i], sources[i] = e, "fetched"
        except Exception:  # a lookup that fails only means the images are encoded here
            logger.exception("%s: fetching image embeddings from peers failed; encoding them here", what)

    def _local(self, images: list[ImageInput], keys: list[bytes]) -> tuple[list, list[str]]:
        """(embeddings or None, "stored" | "lru" | "") from the host tier, then the LRU."""
        store, embeds, sources = self.engine.store, [], []
        for img, key in zip(images, keys):
            e = load_embedding(store, key, self.encoder.embed_shape(img)) if store is not None else None
            source = "stored" if e is not None else ""
            if e is None and (e := self.encoder.cached(key)) is not None:
                source = "lru"
            embeds.append(None if e is None else e.to(self.engine.device))
            sources.append(source)
            if e is not None and self.metrics is not None:
                self.metrics.image_embedded("cached")
        return embeds, sources

    def _encode(self, images: list[ImageInput], keys: list[bytes]) -> list[torch.Tensor]:
        out = []
        for img, key in zip(images, keys):
            t0 = time.perf_counter()
            out.append(self.encoder.encode(img, key))
            if self.metrics is not None:
                self.metrics.image_embedded("encoded", time.perf_counter() - t0)
        return out

    def _keep(self, images: list[ImageInput], keys: list[bytes], embeds: list[torch.Tensor]) -> None:
        """Remember embeddings in the LRU and the host tier (whose KV events publish them)."""
        for img, key, e in zip(images, keys, embeds):
            self.encoder.remember(key, e)
            if self.engine.store is not None and not store_embedding(self.engine.store, key, e.to(self.engine.dtype)):
                logger.debug("image %s: its embeddings do not fit the host tier", img.hash.hex()[:12])

    async def _from_holders(self, images: list[ImageInput], keys: list[bytes], missing: list[int],
                            holders: Sequence[tuple[str, str]], what: str) -> dict[int, torch.Tensor]:
        """The embeddings of `missing` images from the holders the router named, one transfer per
        holder, whether or not this worker lists it as a peer yet (its peer list is refreshed each
        heartbeat) and whether or not it fetches from peers itself.

        Trust: only a caller holding the cluster secret's token reaches `Generate` (the router), and
        that caller already names the address a decode worker pulls a handoff's KV from
        (`KVHandoff.source_address`, dialled as given, not checked against the registry). A holder
        address is trusted the same way and adds no reach: it is dialled with this worker's
        transfer client (the cluster token, the data plane's challenge-response), only the entries
        of these embeddings' keys are asked for, in this worker's layout, every byte verified; a
        holder that lacks them or cannot be reached only sends the image on to the next step."""
        plan: dict[tuple[str, str], list[int]] = {}
        for i in missing:
            worker, address = holders[i]
            if address:
                plan.setdefault((worker, address), []).append(i)
        return await self._fetch_plan(images, keys, plan, what)

    async def _from_peers(self, images: list[ImageInput], keys: list[bytes], missing: list[int],
                          what: str) -> dict[int, torch.Tensor]:
        """The embeddings of `missing` images that peers hold in full (per the KV index), one
        transfer per peer."""
        peers = self.peers()
        if not peers:
            return {}
        entries = self._entries(images, keys, missing)
        plan: dict[tuple[str, str], list[int]] = {}
        for i, held in (await self.index.holders(entries, list(peers), CHUNK_MEDIUMS)).items():
            worker = min(held)
            plan.setdefault((worker, peers[worker]), []).append(i)
        return await self._fetch_plan(images, keys, plan, what)

    def _entries(self, images: list[ImageInput], keys: list[bytes], chosen: list[int]) -> dict[int, list[bytes]]:
        """Each chosen image's entry keys in the tiers' layout."""
        layout = self.engine.connector.layout
        return {i: embedding_keys(keys[i], self.encoder.embed_shape(images[i]), layout) for i in chosen}

    async def _fetch_plan(self, images: list[ImageInput], keys: list[bytes],
                          plan: dict[tuple[str, str], list[int]], what: str) -> dict[int, torch.Tensor]:
        """Fetch each (worker, address)'s images of `plan` in one transfer; the embeddings that came whole."""
        entries = self._entries(images, keys, [i for chosen in plan.values() for i in chosen])
        results = await asyncio.gather(*(self._fetch(address, worker, chosen, entries, what)
                                         for (worker, address), chosen in plan.items()))
        got: dict[int, torch.Tensor] = {}
        for kv, chosen in zip(results, plan.values()):
            at = 0
            for i in chosen:
                m = len(entries[i])
                if kv is None or at + m > kv.shape[0]:  # the holder no longer holds all of it
                    break
                got[i] = unpack_embedding(kv[at:at + m], self.encoder.embed_shape(images[i])).to(self.engine.device)
                at += m
                if self.metrics is not None:
                    self.metrics.image_embedded("fetched")
        return got

    async def _fetch(self, address: str, worker: str, chosen: list[int], entries: dict[int, list[bytes]],
                     what: str) -> torch.Tensor | None:
        t0 = time.perf_counter()
        try:
            kv = await self.client.fetch_kv(address, [k for i in chosen for k in entries[i]],
                                            self.engine.connector.layout, self.timeout_s)
        except (TransferError, ValueError) as e:
            logger.warning("%s: fetching %d image embeddings from %s failed, encoding them here: %s", what,
                           len(chosen), worker, e)
            if self.metrics is not None:
                self.metrics.kv_transfer_failed()
            return None
        if self.metrics is not None:
            self.metrics.kv_transferred("in", kv.numel() * kv.element_size(), time.perf_counter() - t0)
        return kv
