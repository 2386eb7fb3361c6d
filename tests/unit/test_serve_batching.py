"""The serving batcher: concurrent requests share model calls, the queue is bounded, a request
whose caller gave up leaves the queue, and a failing call fails only its own requests."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from visionflow.serving.batcher import Batcher, Closed, QueueFull


class Model:
    """Returns each image's first value; records the batch sizes it was called with."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.calls: list[int] = []
        self.fail_on = fail_on

    def __call__(self, batch: np.ndarray) -> list[float]:
        self.calls.append(len(batch))
        if self.fail_on is not None and self.fail_on in batch[:, 0]:
            raise ValueError("bad input")
        return [float(x[0]) for x in batch]


def images(*values: float) -> np.ndarray:
    return np.array([[v, 0.0] for v in values], dtype=np.float32)


def test_concurrent_requests_share_one_call_and_each_gets_its_own_outputs():
    async def main():
        model = Model()
        seen: list[tuple[int, int]] = []
        # A delay no test waits out: the call starts because the batch is full.
        b = Batcher(model, 6, 60.0, 100, on_batch=lambda n, m, q: seen.append((n, len(q))))
        results = await asyncio.gather(
            b.submit(images(1)), b.submit(images(2, 3)), b.submit(images(4, 5, 6))
        )
        await b.aclose()
        return model, seen, results

    model, seen, results = asyncio.run(main())
    assert model.calls == [6]
    assert seen == [(6, 3)]
    assert [r.outputs for r in results] == [[1.0], [2.0, 3.0], [4.0, 5.0, 6.0]]
    assert all(r.batch_size == 6 and r.queue_s >= 0 and r.model_s >= 0 for r in results)


def test_a_batch_never_exceeds_max_batch_size_and_a_request_is_never_split():
    async def main():
        model = Model()
        b = Batcher(model, 4, 0.05, 100)
        results = await asyncio.gather(
            b.submit(images(1, 2)),
            b.submit(images(3, 4)),
            b.submit(images(5, 6)),
            b.submit(images(*range(10, 17))),  # 7 images: more than a batch, runs alone
        )
        await b.aclose()
        return model, results

    model, results = asyncio.run(main())
    assert model.calls == [4, 2, 7]
    assert results[2].outputs == [5.0, 6.0] and results[3].outputs == [
        float(v) for v in range(10, 17)
    ]


def test_the_first_request_waits_at_most_max_delay_for_company():
    async def main():
        model = Model()
        b = Batcher(model, 32, 0.01, 100)
        first = await b.submit(images(1))  # alone: answered once the delay is over
        await b.aclose()
        return model, first

    model, first = asyncio.run(main())
    assert model.calls == [1] and first.outputs == [1.0] and first.batch_size == 1


def test_a_full_queue_refuses_at_once_and_a_request_that_gave_up_frees_its_room():
    async def main():
        model = Model()
        depth: list[int] = []
        b = Batcher(model, 3, 60.0, 3, name="m/1", on_queue=depth.append)
        waiting = asyncio.ensure_future(b.submit(images(1, 2)))
        await asyncio.sleep(0)  # it is queued: 2 of 3 images
        with pytest.raises(
            QueueFull, match=r"holds 2 of serve.queue_size=3 images; this request has 2"
        ):
            await b.submit(images(3, 4))
        waiting.cancel()  # its caller timed out
        await asyncio.sleep(0)
        room = b.waiting
        answered = await asyncio.wait_for(
            b.submit(images(5, 6, 7)), 120
        )  # room again: a full batch
        await b.aclose()
        return model, depth, room, answered

    model, depth, room, answered = asyncio.run(main())
    assert room == 0 and depth[:2] == [2, 0]
    assert answered.outputs == [5.0, 6.0, 7.0]
    assert model.calls == [3]  # the abandoned images were never computed


def test_a_failed_call_fails_its_requests_only_and_the_batcher_goes_on():
    async def main():
        model = Model(fail_on=13)
        b = Batcher(model, 2, 0.01, 100)
        bad = await asyncio.gather(
            b.submit(images(13)), b.submit(images(1)), return_exceptions=True
        )
        good = await b.submit(images(2))
        await b.aclose()
        return bad, good

    bad, good = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) for e in bad)
    assert "model call failed (ValueError: bad input)" in str(bad[0])
    assert good.outputs == [2.0]


def test_close_answers_what_is_queued_then_refuses():
    async def main():
        model = Model()
        b = Batcher(model, 8, 60.0, 100)
        queued = asyncio.ensure_future(b.submit(images(1)))
        await asyncio.sleep(0)
        b.close()  # no waiting for company any more
        answered = await asyncio.wait_for(queued, 120)
        with pytest.raises(Closed):
            await b.submit(images(2))
        await b.aclose()
        return answered

    assert asyncio.run(main()).outputs == [1.0]


@pytest.mark.parametrize(
    "kwargs", [{"max_batch_size": 0}, {"queue_size": 0}, {"max_delay_s": -1.0}]
)
def test_settings_that_cannot_work_are_refused(kwargs):
    async def main():
        Batcher(Model(), **{"max_batch_size": 1, "max_delay_s": 0.0, "queue_size": 1, **kwargs})

    with pytest.raises(ValueError, match="at least"):
        asyncio.run(main())
