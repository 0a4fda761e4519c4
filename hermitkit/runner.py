"""Running and resuming batches: concurrency, persistence per turn, judging.

For each (model, repetition) a run sends its turns in order; runs go in parallel up to
the batch's concurrency. Every assistant reply is committed as soon as it arrives,
together with the echo that follows it, so a batch can be killed at any moment and
resumed from the store without sending or storing any turn twice. After a run ends,
each judge model gives it one verdict.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from sqlalchemy.exc import IntegrityError

from hermitkit import batches
from hermitkit.client import ChatReply, ModelInfo
from hermitkit.config import BatchConfig, build_config
from hermitkit.errors import (
    AuthenticationError,
    ConfigError,
    ContextLengthError,
    InsufficientCreditsError,
    ProviderError,
)
from hermitkit.judge import JudgeOutcome, ParseFailure, judge_transcript
from hermitkit.protocol import Protocol, build_messages, classify, next_user_message
from hermitkit.providers import ProviderSet
from hermitkit.store import Batch, Store, batch_spent_usd
from hermitkit.lease import LEASE_S, batch_lease, check_free
from hermitkit.writer import writer_for

log = logging.getLogger("hermitkit.runner")

T = TypeVar("T")

EventCallback = Callable[[dict[str, Any]], None]


@dataclass
class BatchOutcome:
    """The end state of one call that runs or resumes a batch."""

    batch_id: int
    status: str
    message: str | None = None
    run_statuses: dict[str, int] = field(default_factory=dict)
    spent_usd: float = 0.0
    is_demo: bool = False


def reply_cost(reply: ChatReply, info: ModelInfo | None) -> float | None:
    """Return the provider's reported cost, else an estimate from the model list's prices."""
    if reply.cost_usd is not None:
        return reply.cost_usd
    if info is None or info.prompt_price is None or info.completion_price is None:
        return None
    return (reply.prompt_tokens or 0) * info.prompt_price + (reply.completion_tokens or 0) * info.completion_price


class _StopBatch(Exception):
    """Raised inside a worker when the batch must stop scheduling requests."""


class BatchExecution:
    """One pass over a stored batch: sends what is missing and stores it.

    Used by ``run_batch`` for a new batch and by ``resume_batch`` for an old one.
    ``cancel`` may be set from any thread; requests already in flight finish and are
    stored, and no new request is sent.
    """

    def __init__(
        self,
        store: Store,
        batch_id: int,
        config: BatchConfig,
        protocol: Protocol,
        providers: ProviderSet,
        catalogue: dict[str, ModelInfo],
        *,
        progress: bool = True,
        on_event: EventCallback | None = None,
        cancel: threading.Event | None = None,
    ):
        self.store = store
        self.batch_id = batch_id
        self.config = config
        self.protocol = protocol
        self.providers = providers
        self.catalogue = catalogue
        self.progress = progress
        self.on_event = on_event
        self.cancel = cancel or threading.Event()
        self.spent_usd = 0.0
        self.budget_hit = False
        self.lease_lost = False
        self.fatal: ProviderError | None = None
        self._model_slots: dict[str, asyncio.Semaphore] = {}
        # One writer per batch, so this batch's writes never contend with each other and
        # writes queued while a group is written share the next commit.
        self._writer = writer_for(
            store,
            merged={
                batches.add_exchange: batches.add_exchanges,
                batches.begin_run: batches.begin_runs,
                batches.judge_inputs: batches.judge_inputs_many,
                batches.add_judgement: batches.add_judgements,
            },
            # These run only Core statements, so SQLite writes them without an ORM session.
            core=frozenset({batches.add_exchange, batches.begin_run, batches.load_history, batches.finish_run, batches.judge_inputs, batches.add_judgement}),
            statements={
                batches.add_exchange: batches.add_exchanges_statement,
                batches.begin_run: batches.begin_runs_statement,
                batches.judge_inputs: batches.judge_inputs_statement,
                batches.add_judgement: batches.add_judgements_statement,
            },
        )
        self._bar: Any = None

    async def _db(self, action: Callable[..., T], /, **kwargs: Any) -> T:
        return await self._writer.run(action, **kwargs)

    def _emit(self, kind: str, **data: Any) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event({"event": kind, "batch_id": self.batch_id, **data})
        except Exception:  # noqa: BLE001 - a broken progress callback must not stop a paid batch
            log.exception("Event callback failed for event %s", kind)

    def _check_can_send(self) -> None:
        if self.fatal is not None or self.cancel.is_set() or self.lease_lost:
            raise _StopBatch()
        budget = self.config.budget_usd
        if budget is not None and self.spent_usd >= budget:
            self.budget_hit = True
            raise _StopBatch()

    def _slot(self, model: str) -> asyncio.Semaphore | None:
        limit = self.config.per_model_concurrency
        if limit is None:
            return None
        if model not in self._model_slots:
            self._model_slots[model] = asyncio.Semaphore(limit)
        return self._model_slots[model]

    async def execute(self) -> BatchOutcome:
        try:
            async with batch_lease(self.store, self.batch_id, on_lost=self._lose_lease):
                try:
                    return await self._execute()
                finally:
                    # Every queued write lands before another process may take the batch.
                    await self._writer.aclose()
        finally:
            await self._writer.aclose()
            if self._bar is not None:
                self._bar.close()

    def _lose_lease(self) -> None:
        self.lease_lost = True

    async def _execute(self) -> BatchOutcome:
        self.spent_usd = await self._db(batch_spent_usd, batch_id=self.batch_id)
        tasks = await self._db(batches.pending_work, batch_id=self.batch_id, judges=self.config.judges)
        await self._db(batches.set_batch_status, batch_id=self.batch_id, status="running")
        self._emit("batch_started", runs=len(tasks))

        remaining_turns = sum(max(task.turns_target - task.turn_count, 0) for task in tasks if task.status not in ("completed", "context_exhausted"))
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=remaining_turns, desc=f"batch {self.batch_id}", unit="turn", leave=True)

        queue: asyncio.Queue[batches.RunTask] = asyncio.Queue()
        for task in tasks:
            queue.put_nowait(task)

        workers = [asyncio.create_task(self._worker(queue)) for _ in range(min(self.config.concurrency, max(len(tasks), 1)))]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            if not self.lease_lost:
                # After a lost lease the batch and its runs belong to the process that took it.
                await self._db(batches.interrupt_batch, batch_id=self.batch_id, error="The process was interrupted; resume the batch to finish it.")
            raise

        return await self._finish()

    async def _worker(self, queue: asyncio.Queue[batches.RunTask]) -> None:
        while True:
            try:
                task = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                await self._process(task)
            except _StopBatch:
                return

    async def _process(self, task: batches.RunTask) -> None:
        if task.status not in ("completed", "context_exhausted"):
            status = await self._run(task)
            if status not in ("completed", "context_exhausted"):
                return
        await self._judge(task)

    async def _run(self, task: batches.RunTask) -> str:
        """Send the missing turns of one run; return the run's final status."""
        history = await self._db(batches.begin_run, run_id=task.run_id, initial_prompt=self.protocol.initial_prompt)
        done = sum(1 for message in history if message["role"] == "assistant")
        info = self.catalogue.get(task.model)
        provider = self.providers.for_model(task.model)
        self._emit("run_started", run_id=task.run_id, model=task.model, repetition=task.repetition, turn=done)

        while done < self.config.turns:
            try:
                self._check_can_send()
            except _StopBatch:
                if self.lease_lost:
                    # The run now belongs to the process that took the lease.
                    raise
                if self.budget_hit:
                    status = "budget_exhausted"
                elif self.cancel.is_set():
                    status = "cancelled"
                else:
                    status = "pending"
                await self._db(batches.finish_run, run_id=task.run_id, status=status)
                raise

            messages = build_messages(self.protocol, history)
            try:
                reply = await self._chat(provider, task.model, messages, repetition=task.repetition)
            except ContextLengthError as exc:
                await self._db(batches.finish_run, run_id=task.run_id, status="context_exhausted", error=str(exc))
                self._emit("run_finished", run_id=task.run_id, model=task.model, status="context_exhausted")
                self._advance(self.config.turns - done)
                return "context_exhausted"
            except (AuthenticationError, InsufficientCreditsError) as exc:
                self.fatal = exc
                await self._db(batches.finish_run, run_id=task.run_id, status="failed", error=str(exc))
                raise _StopBatch() from exc
            except ProviderError as exc:
                log.error("Run %d (%s) failed at turn %d: %s", task.run_id, task.model, done + 1, exc)
                await self._db(batches.finish_run, run_id=task.run_id, status="failed", error=str(exc))
                self._emit("run_finished", run_id=task.run_id, model=task.model, status="failed", error=str(exc))
                return "failed"

            classification = classify(reply.content, self.protocol.extraction)
            turn_number = done + 1
            is_last = turn_number >= self.config.turns
            echo = None if is_last else next_user_message(self.protocol, classification)
            cost = reply_cost(reply, info)
            # Counted before the write: the reply is paid for even if storing it waits, and
            # other workers must not send while the spend is already over the budget.
            self.spent_usd += cost or 0.0
            try:
                await self._db(
                    batches.add_exchange,
                    run_id=task.run_id,
                    idx=len(history),
                    turn_number=turn_number,
                    reply=reply,
                    cost_usd=cost,
                    classification=classification,
                    echo=echo,
                    completes_run=is_last,
                )
            except IntegrityError as exc:
                history = await self._db(batches.load_history, run_id=task.run_id)
                stored = sum(1 for message in history if message["role"] == "assistant")
                if stored < turn_number:
                    # Not another process's copy of this turn but a rejected row, for example a foreign
                    # key or check violation. Sending the turn again would fail the same way, paid each time.
                    error = f"Turn {turn_number} could not be stored: {str(exc.orig).strip()}"
                    log.error("Run %d (%s) failed: %s", task.run_id, task.model, error)
                    await self._db(batches.finish_run, run_id=task.run_id, status="failed", error=error)
                    self._emit("run_finished", run_id=task.run_id, model=task.model, status="failed", error=error)
                    return "failed"

                # Another process stored this turn first: continue from its transcript.
                log.warning("Run %d turn %d was already stored by another process; continuing from its transcript", task.run_id, turn_number)
                done = stored
                continue

            history.append({"role": "assistant", "content": reply.content or "", "turn": turn_number, "verdict": classification.verdict})
            if echo is not None:
                history.append({"role": "user", "content": echo, "turn": None, "verdict": None})
            done = turn_number
            self._advance(1)
            self._emit("turn", run_id=task.run_id, model=task.model, turn=turn_number, verdict=classification.verdict, cost_usd=cost)
            if is_last:
                # The last exchange marked the run completed in its own transaction.
                self._emit("run_finished", run_id=task.run_id, model=task.model, status="completed")
                return "completed"

        # Reached when the last turn was stored elsewhere: by a process killed before it
        # marked the run completed, or by another process (the IntegrityError branch).
        await self._db(batches.finish_run, run_id=task.run_id, status="completed")
        self._emit("run_finished", run_id=task.run_id, model=task.model, status="completed")
        return "completed"

    async def _chat(self, provider: Any, model: str, messages: list[dict[str, str]], *, repetition: int) -> ChatReply:
        sampling = self.config.run_sampling(repetition)
        slot = self._slot(model)
        if slot is None:
            return await provider.chat(model, messages, **sampling)
        async with slot:
            return await provider.chat(model, messages, **sampling)

    def _advance(self, turns: int) -> None:
        if self._bar is not None and turns > 0:
            self._bar.update(turns)

    async def _judge(self, task: batches.RunTask) -> None:
        if not self.config.judges:
            return
        pending, transcript, counts = await self._db(batches.judge_inputs, run_id=task.run_id, judges=list(self.config.judges))
        if not pending or counts["turns"] == 0:
            return

        for judge_model in pending:
            self._check_can_send()
            info = self.catalogue.get(judge_model)
            try:
                outcome = await judge_transcript(
                    self.providers.for_model(judge_model),
                    judge_model,
                    transcript,
                    counts,
                    protocol_prompt=self.protocol.initial_prompt,
                    temperature=self.config.judge_temperature,
                    seed=self.config.judge_seed,
                    max_tokens=self.config.judge_max_tokens,
                    supports_structured_output=bool(info and info.supports_structured_output),
                )
            except (AuthenticationError, InsufficientCreditsError) as exc:
                self.fatal = exc
                raise _StopBatch() from exc
            except ContextLengthError as exc:
                # Asking again cannot help: store the failure so it is counted, not retried.
                outcome = JudgeOutcome(
                    status="context_exhausted",
                    verdict=None,
                    raw_reply=None,
                    repair_reply=None,
                    failure=ParseFailure("context_length", str(exc)),
                    attempts=1,
                    truncated=False,
                    prompt_tokens=None,
                    completion_tokens=None,
                    cost_usd=None,
                    sampling=self.config.judge_sampling(),
                )
            except ProviderError as exc:
                # The run stays unjudged by this judge, so a resume sends the request again.
                log.error("Judge %s failed on run %d: %s", judge_model, task.run_id, exc)
                self._emit("judge_failed", run_id=task.run_id, judge=judge_model, error=str(exc))
                continue

            self.spent_usd += outcome.cost_usd or 0.0
            try:
                await self._db(batches.add_judgement, run_id=task.run_id, judge_model=judge_model, round_=0, outcome=outcome)
            except IntegrityError:
                log.warning("Run %d already has a verdict from %s; keeping the stored one", task.run_id, judge_model)
                continue
            self._emit("judged", run_id=task.run_id, model=task.model, judge=judge_model, status=outcome.status)

    async def _finish(self) -> BatchOutcome:
        statuses = await self._db(batches.batch_run_statuses, batch_id=self.batch_id)
        if self.lease_lost:
            # The batch's status is the other process's to write now.
            message = (
                f"This process could not renew its lease on batch {self.batch_id} for {LEASE_S:.0f} s, and another process took "
                f"the batch over, so this one stopped sending. Its stored turns are kept. See `hermitkit status {self.batch_id}`."
            )
            self._emit("batch_finished", status="interrupted", message=message)
            return BatchOutcome(self.batch_id, "interrupted", message, statuses, self.spent_usd, self.providers.is_demo)

        unjudged = await self._db(batches.missing_judgements, batch_id=self.batch_id, judges=self.config.judges)
        unfinished = sum(count for status, count in statuses.items() if status not in ("completed", "context_exhausted"))
        resume_hint = f"Run `hermitkit resume {self.batch_id}` to finish it."

        message: str | None = None
        if self.fatal is not None:
            status, message = "failed", f"{self.fatal} The batch stopped; stored turns are kept. {resume_hint}"
        elif self.budget_hit:
            status = "budget_exhausted"
            message = f"The cost budget of ${self.config.budget_usd:.4f} is spent (${self.spent_usd:.4f}). Resume with a higher budget: `hermitkit resume {self.batch_id} --budget-usd AMOUNT`."
        elif self.cancel.is_set():
            status, message = "cancelled", f"The batch was cancelled. {resume_hint}"
        elif unfinished:
            status, message = "failed", f"{unfinished} run(s) did not finish (see `hermitkit status {self.batch_id}`). {resume_hint}"
        elif unjudged:
            status, message = "failed", f"{unjudged} verdict(s) are missing because a judge request failed. {resume_hint}"
        else:
            status = "completed"

        await self._db(batches.set_batch_status, batch_id=self.batch_id, status=status, error=message)
        self._emit("batch_finished", status=status, message=message)
        return BatchOutcome(self.batch_id, status, message, statuses, self.spent_usd, self.providers.is_demo)


async def _prepare(config: BatchConfig) -> tuple[ProviderSet, dict[str, ModelInfo]]:
    """Open the providers and check the key and every model id, before any chat request."""
    models = list(dict.fromkeys([*config.models, *config.judges]))
    max_connections = config.endpoint.max_connections or max(config.concurrency * 2, 8)
    providers = ProviderSet(config.endpoint, models=models, max_connections=max_connections)
    await providers.open()
    try:
        providers.require_key()
        catalogue = await providers.catalogue()
    except BaseException:
        await providers.close()
        raise
    return providers, catalogue


async def run_batch_async(
    config: BatchConfig | dict[str, Any],
    *,
    store: Store | None = None,
    progress: bool = True,
    on_event: EventCallback | None = None,
    cancel: threading.Event | None = None,
    on_created: Callable[[int], None] | None = None,
) -> BatchOutcome:
    """Validate ``config``, create a batch in the store and run it to the end.

    Raises ConfigError, before any chat request, for a bad config, an unknown model or
    a missing key. Raises AuthenticationError or InsufficientCreditsError when the
    provider rejects the key or the account mid-batch. The batch and its stored turns
    are kept in that case.
    """
    if isinstance(config, dict):
        config = build_config(config)
    store = store or Store()
    protocol = config.load_protocol()

    providers, catalogue = await _prepare(config)
    try:
        await asyncio.to_thread(store.write, partial(batches.upsert_models, endpoint=config.endpoint.base_url, infos=list(catalogue.values())))
        batch_id = await asyncio.to_thread(
            store.write, partial(batches.create_batch, config=config, protocol=protocol, endpoint=config.endpoint.base_url, is_demo=providers.is_demo)
        )
        if on_created is not None:
            on_created(batch_id)
        execution = BatchExecution(store, batch_id, config, protocol, providers, catalogue, progress=progress, on_event=on_event, cancel=cancel)
        outcome = await execution.execute()
    finally:
        await providers.close()

    if execution.fatal is not None:
        raise type(execution.fatal)(outcome.message or str(execution.fatal), status=execution.fatal.status)
    return outcome


def load_batch(store: Store, batch_id: int) -> tuple[BatchConfig, Protocol, Batch]:
    def read(session: Any) -> Batch:
        batch = session.get(Batch, batch_id)
        if batch is None:
            raise ConfigError(f"Batch {batch_id} not found in {store}. Run `hermitkit status` to list batches.")
        return batch

    batch = store.read(read)
    config = build_config(dict(batch.config), source=f"stored config of batch {batch_id}")
    protocol = Protocol(**batch.protocol)
    if protocol.hash != batch.protocol_hash:
        raise ConfigError(f"Batch {batch_id}: the stored protocol does not match its hash {batch.protocol_hash[:12]}; the row was edited by hand.")
    return config, protocol, batch


async def resume_batch_async(
    batch_id: int,
    *,
    store: Store | None = None,
    budget_usd: float | None = None,
    progress: bool = True,
    on_event: EventCallback | None = None,
    cancel: threading.Event | None = None,
) -> BatchOutcome:
    """Continue a stored batch: send only the turns and verdicts it is missing.

    ``budget_usd`` replaces the batch's budget, e.g. to finish a batch that ended as
    ``budget_exhausted``.
    """
    store = store or Store()
    config, protocol, _batch = await asyncio.to_thread(load_batch, store, batch_id)
    # Checked before the new budget is stored, so a batch that another process runs keeps its config.
    await asyncio.to_thread(store.read, partial(check_free, batch_id=batch_id))
    if budget_usd is not None:
        config = config.model_copy(update={"budget_usd": budget_usd})
        config = build_config(config.model_dump(mode="json"), source="--budget-usd")
        await asyncio.to_thread(store.write, partial(_store_config, batch_id=batch_id, config=config))

    providers, catalogue = await _prepare(config)
    try:
        execution = BatchExecution(store, batch_id, config, protocol, providers, catalogue, progress=progress, on_event=on_event, cancel=cancel)
        outcome = await execution.execute()
    finally:
        await providers.close()

    if execution.fatal is not None:
        raise type(execution.fatal)(outcome.message or str(execution.fatal), status=execution.fatal.status)
    return outcome


def _store_config(session: Any, *, batch_id: int, config: BatchConfig) -> None:
    batch = session.get(Batch, batch_id)
    batch.config = config.model_dump(mode="json")
    batch.budget_usd = config.budget_usd


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to the end from synchronous code, also inside Jupyter.

    A notebook kernel already runs an event loop in its main thread, where
    ``asyncio.run`` is not allowed, so the coroutine then runs on a new loop in a
    worker thread while the caller waits.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hermitkit-sync") as pool:
        return pool.submit(asyncio.run, coroutine).result()


def run_batch(
    config: BatchConfig | dict[str, Any],
    *,
    store: Store | None = None,
    progress: bool = True,
    on_event: EventCallback | None = None,
    cancel: threading.Event | None = None,
    on_created: Callable[[int], None] | None = None,
) -> BatchOutcome:
    """Validate ``config``, create a batch and run it to the end; works in scripts, Jupyter and papermill.

    The synchronous form of ``run_batch_async``, which documents the arguments and errors.
    """
    return run_sync(run_batch_async(config, store=store, progress=progress, on_event=on_event, cancel=cancel, on_created=on_created))


def resume_batch(
    batch_id: int,
    *,
    store: Store | None = None,
    budget_usd: float | None = None,
    progress: bool = True,
    on_event: EventCallback | None = None,
    cancel: threading.Event | None = None,
) -> BatchOutcome:
    """Send only the turns and verdicts that a stored batch is missing; works in scripts, Jupyter and papermill.

    ``budget_usd`` replaces the batch's budget. Raises BatchBusyError, before any request,
    when another process holds the batch's lease. The synchronous form of
    ``resume_batch_async``.
    """
    return run_sync(resume_batch_async(batch_id, store=store, budget_usd=budget_usd, progress=progress, on_event=on_event, cancel=cancel))
