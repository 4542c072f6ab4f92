"""Encode workers for a request's images: make sure the cluster holds each image's embeddings.

Before a request with images is placed (colocated or prefill/decode), when the model has encode
workers up: the entries of every image's embedding (`kvstore.keys.embedding_key`: the image's
content hash, model, tenant namespace, cluster salt) are looked up in the KV index, ONE round trip
(the first entry of each: a worker stores an embedding's entries together); the images that no
worker holds go in one `Encode` call to the encode worker with the fewest images in flight: the
larger of what it last reported (every router's calls, `WorkerLoad.num_waiting`) and this router's
own calls to it (sent since, or before its report). The encode worker answers once the embeddings
are stored and published. The request then names, per image, the worker that holds its embedding
(`embedding_holders`: the first holder the index lists, fastest tier first, else the encode worker),
and the prefill (or colocated) worker fetches it from there through the KV transfer path
(worker/embedding_stage.py), even before its own peer list has the encode worker and even with
`--peer-fetch false`; without a holder named it looks the image up in the index among its peers.
Nothing is lost when this fails: with no encode worker up, a failed lookup or a failed call, the
request goes on (with no holder named for those images) and its worker encodes the images itself
(each case counted in `kvweave_router_image_embeddings_total`). An image the encode worker cannot
decode is the client's error (InvalidRequestError), as it would be on the prefill worker.
"""
from __future__ import annotations

import itertools
import logging

import grpc
import redis

from controlplane.forwarding import RoutedRequest
from controlplane.metrics import RouterMetrics
from controlplane.worker_pool import PoolWorker, WorkerPool
from kvstore.index import CHUNK_MEDIUMS, KVIndex
from kvstore.keys import ExtraKeysCache, embedding_entry_keys, embedding_key
from kvweave.errors import InvalidRequestError
from kvweave.registry import ROLES
from kvweave.v1 import worker_pb2

logger = logging.getLogger(__name__)

ENCODE_ROLES = ("encode",)


class EncodeDispatcher:
    def __init__(self, pool: WorkerPool, index: KVIndex, metrics: RouterMetrics, extra: ExtraKeysCache) -> None:
        self.pool, self.index, self.metrics, self.extra = pool, index, metrics, extra
        self._turn = itertools.count()

    async def ensure(self, req: RoutedRequest) -> None:
        """Have an encode worker encode the request's images that no worker holds, and name each
        image's holder in `req.message.embedding_holders` (see above)."""
        if not req.images:
            return
        encoders = self.pool.eligible(roles=ENCODE_ROLES)
        if not encoders:
            self.metrics.image_embeddings.labels("local").inc(len(req.images))
            return
        extra = self.extra.get(req.tenant)
        first = [embedding_entry_keys(embedding_key(img.hash, extra), 1, 1)[0] for img in req.images]
        workers = {w.worker_id: w for w in self.pool.eligible(roles=ROLES)}
        try:
            located = await self.index.locate(first, list(workers), CHUNK_MEDIUMS)
        except (redis.RedisError, OSError) as e:
            logger.warning("request %s: embedding lookup failed (%s); its worker encodes its images", req.req_id, e)
            self.metrics.count_degraded("index_lookup")
            self.metrics.image_embeddings.labels("local").inc(len(req.images))
            return
        holders = [workers[locs[0].worker_id] if locs else None for locs in located]  # the fastest tier's
        missing = [k for k, w in enumerate(holders) if w is None]
        self.metrics.image_embeddings.labels("held").inc(len(req.images) - len(missing))
        if missing:
            encoder = self._least_loaded(encoders)
            if await self._encode(req, encoder, [req.images[k] for k in missing]):
                for k in missing:
                    holders[k] = encoder
        if any(w is not None for w in holders):
            req.message.embedding_holders.extend(
                worker_pb2.EmbeddingHolder(worker_id=w.worker_id, address=w.info.address) if w is not None
                else worker_pb2.EmbeddingHolder() for w in holders)

    def _least_loaded(self, encoders: list[PoolWorker]) -> PoolWorker:
        turn, n = next(self._turn), len(encoders)
        return min(enumerate(encoders),
                   key=lambda iw: (max(iw[1].info.load.num_waiting, iw[1].num_local_waiting), (iw[0] - turn) % n))[1]

    async def _encode(self, req: RoutedRequest, encoder: PoolWorker, images: list) -> bool:
        """Whether `encoder` now holds the images' embeddings."""
        message = worker_pb2.EncodeRequest(images=[img.data for img in images], cache_namespace=req.tenant)
        encoder.num_local_waiting += len(images)
        try:
            await encoder.stub.Encode(message, timeout=max(0.001, req.remaining_s()))
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidRequestError(e.details() or "bad image", "messages") from None
            logger.warning("request %s: encode worker %s failed (%s: %s); its worker encodes its images",
                           req.req_id, encoder.worker_id, e.code().name, e.details())
            self.metrics.image_embeddings.labels("local").inc(len(images))
            return False
        finally:
            encoder.num_local_waiting -= len(images)
        self.metrics.image_embeddings.labels("encoded").inc(len(images))
        logger.debug("request %s: %d images encoded on %s", req.req_id, len(images), encoder.worker_id)
        return True
