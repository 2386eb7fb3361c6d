"""The load for `benchmarks.serve`: each user posts one pre-serialised image, back to back.

Run by locust (its own venv, `.venv-bench`), not imported by the project. The environment says
what to send: BENCH_BODY (a file with the request body, read once), BENCH_PATH (the route) and
BENCH_EXPECT (bytes a good response body contains: the output's name).
"""

import os

from locust import FastHttpUser, constant, task

with open(os.environ["BENCH_BODY"], "rb") as f:
    BODY = f.read()
PATH = os.environ["BENCH_PATH"]
EXPECT = os.environ["BENCH_EXPECT"].encode()
HEADERS = {"Content-Type": "application/json"}


class Client(FastHttpUser):
    wait_time = constant(0)  # closed loop: each user has one request in flight at a time

    @task
    def infer(self) -> None:
        with self.client.post(
            PATH, data=BODY, headers=HEADERS, name="infer", catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
            elif EXPECT not in (resp.content or b""):
                resp.failure(f"no {EXPECT.decode()!r} in the response")
            else:
                resp.success()
