"""Judging stored runs again, with any judge model, without generating them again.

Each new verdict is stored as a new row in the next round for that judge and run, so
earlier verdicts stay beside it and agreement between judges (or between rounds of one
judge) can be measured. The judge's sampling settings come from the batch's stored
config.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from sqlalchemy import func, select

from hermitkit import batches
from hermitkit.errors import (
    AuthenticationError,
    ConfigError,
    ContextLengthError,
    InsufficientCreditsError,
    ProviderError,
)
from hermitkit.judge import JudgeOutcome, ParseFailure, judge_transcript
from hermitkit.store import FINAL_RUN_STATUSES, Judgement, Run, Store

log = logging.getLogger("hermitkit.rejudge")


@dataclass
class RejudgeOutcome:
    """The counts, errors and cost of one re-judging pass."""

    batch_id: int
    judge_model: str
    judged: int = 0
    parse_failures: int = 0
    errors: dict[int, str] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)
    cost_usd: float = 0.0
    # Finished runs left unjudged because the budget was spent.
    over_budget: list[int] = field(default_factory=list)


def _finished_runs(session: Any, batch_id: int, judge_model: str, rounds: int | None) -> tuple[list[tuple[int, int]], list[int]]:
    """Return the finished runs with the number of verdicts each needs, and the unfinished runs.

    Without ``rounds`` every finished run needs one more verdict. With it, a run needs as
    many as it lacks to have ``rounds`` verdicts from ``judge_model``.
    """
    rows = session.execute(select(Run.id, Run.status, Run.turn_count).where(Run.batch_id == batch_id).order_by(Run.id)).all()
    finished = [run_id for run_id, status, turns in rows if status in FINAL_RUN_STATUSES and turns > 0]
    skipped = [run_id for run_id, status, turns in rows if run_id not in finished]
    if rounds is None:
        return [(run_id, 1) for run_id in finished], skipped

    stored = dict(
        session.execute(
            select(Judgement.run_id, func.count()).where(Judgement.run_id.in_(finished), Judgement.judge_model == judge_model).group_by(Judgement.run_id)
        ).all()
    )
    needed = [(run_id, rounds - stored.get(run_id, 0)) for run_id in finished]
    return [(run_id, count) for run_id, count in needed if count > 0], skipped


async def rejudge_batch_async(
    store: Store,
    batch_id: int,
    judge_model: str,
    *,
    only_missing: bool = False,
    rounds: int | None = None,
    concurrency: int | None = None,
    budget_usd: float | None = None,
) -> RejudgeOutcome:
    """Judge every finished run of a batch with ``judge_model`` and store the verdicts.

    With ``rounds=N`` each finished run is judged until it has N verdicts from
    ``judge_model``, so running the same call again finishes a pass that stopped (killed,
    over budget or failed requests) and sends nothing once it is complete.
    ``only_missing=True`` is the same as ``rounds=1``: only runs without any verdict
    from ``judge_model`` are judged. Runs that are not finished (or have no
    turns) are skipped and listed in ``skipped``. A provider
    error on one run is logged and recorded in ``errors``; authentication and credit
    errors stop the pass and propagate.

    ``budget_usd`` stops sending once the verdicts of this pass have cost that much;
    the runs left are listed in ``over_budget``. Requests already in flight finish and
    are stored, so the pass can cost up to ``concurrency`` verdicts more than the budget.
    """
    from hermitkit.lease import batch_lease
    from hermitkit.providers import ProviderSet
    from hermitkit.runner import load_batch

    if budget_usd is not None and not budget_usd > 0:
        raise ConfigError(f"budget_usd={budget_usd} is invalid: give a positive amount in US dollars.")
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1):
        raise ConfigError(f"rounds={rounds!r} is invalid: give the number of verdicts from this judge that each run should have, 1 or more.")
    if only_missing:
        if rounds not in (None, 1):
            raise ConfigError(f"only_missing=True is the same as rounds=1, so it cannot be combined with rounds={rounds}. Pass one of them.")
        rounds = 1

    config, protocol, _batch = await asyncio.to_thread(load_batch, store, batch_id)
    ready, skipped = await asyncio.to_thread(store.read, partial(_finished_runs, batch_id=batch_id, judge_model=judge_model, rounds=rounds))
    outcome = RejudgeOutcome(batch_id, judge_model, skipped=skipped)
    if not ready:
        return outcome

    # Another process that runs or rejudges this batch at the same time would pay for the same verdicts.
    lease_lost = asyncio.Event()
    async with batch_lease(store, batch_id, on_lost=lease_lost.set):
        providers = ProviderSet(config.endpoint, models=[judge_model])
        await providers.open()
        try:
            providers.require_key()
            catalogue = await providers.catalogue()
            info = catalogue.get(judge_model)
            provider = providers.for_model(judge_model)
            slots = asyncio.Semaphore(concurrency or config.concurrency)

            def budget_spent() -> bool:
                return budget_usd is not None and outcome.cost_usd >= budget_usd

            def must_stop(run_id: int) -> bool:
                if lease_lost.is_set():
                    outcome.errors[run_id] = "Not judged: another process took over this batch's lease, so this pass stopped sending."
                    return True
                if budget_spent():
                    outcome.over_budget.append(run_id)
                    return True
                return False

            async def judge_one(run_id: int, needed: int) -> None:
                if must_stop(run_id):
                    return
                transcript, counts = await asyncio.to_thread(store.read, partial(batches.judge_transcript_rows, run_id=run_id))
                # The verdicts of one run are sent one after the other, so each gets the next round.
                for _ in range(needed):
                    async with slots:
                        # Checked again after the wait for a slot, when other verdicts may have spent the budget.
                        if must_stop(run_id):
                            return
                        try:
                            result = await judge_transcript(
                                provider,
                                judge_model,
                                transcript,
                                counts,
                                protocol_prompt=protocol.initial_prompt,
                                temperature=config.judge_temperature,
                                seed=config.judge_seed,
                                max_tokens=config.judge_max_tokens,
                                supports_structured_output=bool(info and info.supports_structured_output),
                            )
                        except ContextLengthError as exc:
                            result = JudgeOutcome("context_exhausted", None, None, None, ParseFailure("context_length", str(exc)), 1, False, None, None, None, config.judge_sampling())
                        # Counted before the slot is released, so that the next budget check includes it.
                        outcome.cost_usd += result.cost_usd or 0.0
                    await asyncio.to_thread(store.write, partial(_store_verdict, run_id=run_id, judge_model=judge_model, outcome=result))
                    outcome.judged += 1
                    outcome.parse_failures += result.status != "ok"

            async def guarded(run_id: int, needed: int) -> None:
                try:
                    await judge_one(run_id, needed)
                except (AuthenticationError, InsufficientCreditsError):
                    raise
                except ProviderError as exc:
                    log.error("Judge %s failed on run %d: %s", judge_model, run_id, exc)
                    outcome.errors[run_id] = str(exc)

            await asyncio.gather(*(guarded(run_id, needed) for run_id, needed in ready))
        finally:
            await providers.close()
    outcome.over_budget.sort()
    return outcome


def _store_verdict(session: Any, *, run_id: int, judge_model: str, outcome: JudgeOutcome) -> None:
    # The round is read and written in one transaction, so two passes never share one.
    round_ = batches.next_judge_round(session, run_id, judge_model)
    batches.add_judgement(session, run_id=run_id, judge_model=judge_model, round_=round_, outcome=outcome)


def rejudge_batch(
    store: Store,
    batch_id: int,
    judge_model: str,
    *,
    only_missing: bool = False,
    rounds: int | None = None,
    concurrency: int | None = None,
    budget_usd: float | None = None,
) -> RejudgeOutcome:
    """Judge every finished run of a batch with ``judge_model``; works in scripts, Jupyter and papermill.

    The synchronous form of ``rejudge_batch_async``, which documents the arguments.
    """
    from hermitkit.runner import run_sync

    return run_sync(rejudge_batch_async(store, batch_id, judge_model, only_missing=only_missing, rounds=rounds, concurrency=concurrency, budget_usd=budget_usd))
