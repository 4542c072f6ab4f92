"""Encode workers for a request's images: make sure the cluster holds each image's embeddings.

Before a request with images is placed (colocated or prefill/decode), when the model has encode
workers up: the entries of every image's embedding (`kvstore.keys.embedding_key`: the image's
content hash, model, tenant namespace, cluster salt) are looked up in the KV index, ONE round trip
(the first entry of each: a worker stores an embedding's entries together); the images that no
worker holds go in one `Encode` call to the encode worker with the fewest Encode calls in flight
from this router. The encode worker answers once the embeddings are stored and published, so the
prefill (or colocated) worker then finds them in the index and fetches them through the KV
transfer path (worker/embedding_stage.py). Nothing is lost when this fails: with no encode worker
up, a failed lookup or a failed call, the request goes on and its worker encodes the images itself
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
        """Have an encode worker encode the request's images that no worker holds (see above)."""
        if not req.images:
            return
        encoders = self.pool.eligible(roles=ENCODE_ROLES)
        if not encoders:
            self.metrics.image_embeddings.labels("local").inc(len(req.images))
            return
        extra = self.extra.get(req.tenant)
        first = [embedding_entry_keys(embedding_key(img.hash, extra), 1, 1)[0] for img in req.images]
        holders = [w.worker_id for w in self.pool.eligible(roles=ROLES)]
        try:
            located = await self.index.locate(first, holders, CHUNK_MEDIUMS)
        except (redis.RedisError, OSError) as e:
            logger.warning("request %s: embedding lookup failed (%s); its worker encodes its images", req.req_id, e)
            self.metrics.count_degraded("index_lookup")
            self.metrics.image_embeddings.labels("local").inc(len(req.images))
            return
        missing = [img for img, locs in zip(req.images, located) if not locs]
        self.metrics.image_embeddings.labels("held").inc(len(req.images) - len(missing))
        if missing:
            await self._encode(req, self._least_loaded(encoders), missing)

    def _least_loaded(self, encoders: list[PoolWorker]) -> PoolWorker:
        turn, n = next(self._turn), len(encoders)
        return min(enumerate(encoders), key=lambda iw: (iw[1].num_local_waiting, (iw[0] - turn) % n))[1]

    async def _encode(self, req: RoutedRequest, encoder: PoolWorker, images: list) -> None:
        message = worker_pb2.EncodeRequest(images=[img.data for img in images], cache_namespace=req.tenant)
        encoder.num_local_waiting += 1
        try:
            await encoder.stub.Encode(message, timeout=max(0.001, req.remaining_s()))
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidRequestError(e.details() or "bad image", "messages") from None
            logger.warning("request %s: encode worker %s failed (%s: %s); its worker encodes its images",
                           req.req_id, encoder.worker_id, e.code().name, e.details())
            self.metrics.image_embeddings.labels("local").inc(len(images))
            return
        finally:
            encoder.num_local_waiting -= 1
        self.metrics.image_embeddings.labels("encoded").inc(len(images))
        logger.debug("request %s: %d images encoded on %s", req.req_id, len(images), encoder.worker_id)
