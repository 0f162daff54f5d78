"""corral: a structured-concurrency task engine on anyio.

Push many items through an async (or plain) function with bounded memory,
errors as values and every item accounted for, on asyncio, uvloop and trio.
"""

from ._adaptive import AdaptiveRate as AdaptiveRate
from ._adaptive import AdaptiveRateStatistics as AdaptiveRateStatistics
from ._batcher import Batcher as Batcher
from ._batcher import BatcherStats as BatcherStats
from ._breaker import CircuitBreaker as CircuitBreaker
from ._breaker import CircuitBreakerStatistics as CircuitBreakerStatistics
from ._budget import RetryBudget as RetryBudget
from ._budget import RetryBudgetStatistics as RetryBudgetStatistics
from ._concurrency import AdaptiveLimiter as AdaptiveLimiter
from ._concurrency import AdaptiveLimiterStatistics as AdaptiveLimiterStatistics
from ._errors import CircuitOpen as CircuitOpen
from ._errors import CorralError as CorralError
from ._errors import FlushError as FlushError
from ._errors import JobCancelled as JobCancelled
from ._errors import PoolClosed as PoolClosed
from ._errors import QueueFull as QueueFull
from ._errors import RetryError as RetryError
from ._hedge import Hedge as Hedge
from ._hedge import HedgeStatistics as HedgeStatistics
from ._helpers import ApplyToEach as ApplyToEach
from ._helpers import Outcomes as Outcomes
from ._helpers import apply_to_all as apply_to_all
from ._helpers import apply_to_each as apply_to_each
from ._limits import SlidingWindow as SlidingWindow
from ._limits import TokenBucket as TokenBucket
from ._middleware import Middleware as Middleware
from ._middleware import RateLimiter as RateLimiter
from ._middleware import Timeout as Timeout
from ._observe import ProgressBar as ProgressBar
from ._outcome import Job as Job
from ._outcome import Outcome as Outcome
from ._pool import Pool as Pool
from ._pool import PoolStats as PoolStats
from ._queue import Queue as Queue
from ._queue import QueueStatistics as QueueStatistics
from ._retry import Retry as Retry
from ._retry import backoff as backoff

__all__ = [
    "AdaptiveLimiter",
    "AdaptiveLimiterStatistics",
    "AdaptiveRate",
    "AdaptiveRateStatistics",
    "ApplyToEach",
    "Batcher",
    "BatcherStats",
    "CircuitBreaker",
    "CircuitBreakerStatistics",
    "CircuitOpen",
    "CorralError",
    "FlushError",
    "Hedge",
    "HedgeStatistics",
    "Job",
    "JobCancelled",
    "Middleware",
    "Outcome",
    "Outcomes",
    "Pool",
    "PoolClosed",
    "PoolStats",
    "ProgressBar",
    "Queue",
    "QueueFull",
    "QueueStatistics",
    "RateLimiter",
    "Retry",
    "RetryBudget",
    "RetryBudgetStatistics",
    "RetryError",
    "SlidingWindow",
    "Timeout",
    "TokenBucket",
    "apply_to_all",
    "apply_to_each",
    "backoff",
]

__version__ = "0.2.0"
