"""Misuse the public types must reject, run by ``nox -s typing``.

Every line below is a mistake, and both checkers must flag it. Each carries
mypy's ``# type: ignore[code]`` and pyright's ``# pyright: ignore[rule]`` for
exactly the errors it raises. mypy --strict reports an ignore that is not
needed (``warn_unused_ignores``), and pyright is configured in pyproject.toml
to disregard ``# type: ignore`` (``enableTypeIgnoreComments = false``) and to
report a ``# pyright: ignore`` that is not needed. So a line that stops being
an error, for either checker, fails the typing session: the types got looser.

Nothing here runs under pytest.
"""

from __future__ import annotations

import corral


async def fetch(n: int) -> str:
    return str(n)


def render(n: int) -> str:
    return str(n)


async def embed(texts: list[str]) -> list[float]:
    return [float(len(text)) for text in texts]


def log_bytes(outcome: corral.Outcome[bytes, str]) -> None:
    pass


async def items_of_the_wrong_type() -> None:
    await corral.apply_to_all(fetch, ["1", "2"])  # type: ignore[arg-type]  # pyright: ignore[reportCallIssue, reportArgumentType]
    await corral.apply_to_all(render, ["1", "2"])  # type: ignore[arg-type]  # pyright: ignore[reportCallIssue, reportArgumentType]
    corral.apply_to_each(fetch, [b"1"])  # type: ignore[arg-type]  # pyright: ignore[reportCallIssue, reportArgumentType]
    await corral.apply_to_all(fetch, 5)  # type: ignore[call-overload]  # pyright: ignore[reportCallIssue, reportArgumentType]
    corral.Pool(fetch, on_outcome=log_bytes)  # type: ignore[misc]  # pyright: ignore[reportCallIssue, reportArgumentType]


async def awaiting_a_context_manager() -> None:
    await corral.apply_to_each(fetch, [1])  # type: ignore[misc]  # pyright: ignore[reportGeneralTypeIssues]


async def not_a_handler() -> None:
    await corral.apply_to_all(42, [1, 2])  # type: ignore[call-overload]  # pyright: ignore[reportCallIssue, reportArgumentType]
    await corral.apply_to_all("fetch", [1, 2])  # type: ignore[call-overload]  # pyright: ignore[reportCallIssue, reportArgumentType]
    corral.Pool(None)  # type: ignore[call-overload]  # pyright: ignore[reportCallIssue, reportArgumentType]
    corral.Batcher(3)  # type: ignore[call-overload]  # pyright: ignore[reportCallIssue, reportArgumentType]


async def submitting_the_wrong_type(
    pool: corral.Pool[int, str], batcher: corral.Batcher[str, float]
) -> None:
    await pool.submit("x")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    pool.submit_nowait(b"x")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    await batcher.submit(1)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    batcher.add_nowait(None)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]


def options_of_the_wrong_type() -> None:
    corral.Retry(attempts="3")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    corral.Retry(3, wait_initial="0.1")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    corral.TokenBucket("10")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    corral.Timeout(seconds=None)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    corral.Pool(fetch, workers="4")  # type: ignore[call-overload]  # pyright: ignore[reportCallIssue, reportArgumentType]
    corral.Pool(fetch, rate_limit=object())  # type: ignore[call-overload]  # pyright: ignore[reportCallIssue, reportArgumentType]
    corral.Batcher(embed, max_wait="1")  # type: ignore[call-overload]  # pyright: ignore[reportCallIssue, reportArgumentType]


def result_as_an_int(outcome: corral.Outcome[int, str]) -> int:
    return outcome.unwrap()  # type: ignore[return-value]  # pyright: ignore[reportReturnType]


def result_never_none(outcome: corral.Outcome[int, str]) -> str:
    return outcome.result.upper()  # type: ignore[union-attr]  # pyright: ignore[reportOptionalMemberAccess]


def results_of_the_wrong_type(
    outcome: corral.Outcome[int, str], job: corral.Job[int, str]
) -> list[object]:
    result: int | None = outcome.result  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
    item: str = outcome.item  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
    other: corral.Outcome[str, str] | None = job.outcome  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
    return [result, item, other]


async def batch_results_of_the_wrong_type(batcher: corral.Batcher[str, float]) -> str:
    return await batcher.submit("text")  # type: ignore[return-value]  # pyright: ignore[reportReturnType]


def on_batcher_stats(stats: corral.BatcherStats) -> None:
    pass


def observing_with_the_wrong_types() -> None:
    corral.Pool(fetch, on_stats=on_batcher_stats)  # type: ignore[arg-type]  # pyright: ignore[reportCallIssue, reportArgumentType]
    corral.Pool(fetch, progress="yes")  # type: ignore[call-overload]  # pyright: ignore[reportCallIssue, reportArgumentType]
    corral.Batcher(embed, stats_interval="1")  # type: ignore[call-overload]  # pyright: ignore[reportCallIssue, reportArgumentType]


def connecting_to_what_is_not_redis() -> None:
    import coredis

    from corral.redis import connect

    connect(6379)  # type: ignore[call-overload]  # pyright: ignore[reportCallIssue, reportArgumentType]
    connect(coredis.Redis(), db=1)  # type: ignore[call-overload]  # pyright: ignore[reportArgumentType]
    connect("redis://localhost", decode_responses="yes")  # type: ignore[call-overload]  # pyright: ignore[reportCallIssue, reportArgumentType]
