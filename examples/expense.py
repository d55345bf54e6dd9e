"""An expense approval pipeline: review an expense, wait for a manager's decision, pay it.

`expense_demo.py` runs it across two processes. The command line finds it with
`--app expense:pipelines` when this directory is on PYTHONPATH:

    PYTHONPATH=examples waystation --db runs.db resume RUN_ID \\
        --input '{"approved": true, "by": "dana"}' --app expense:pipelines

Import it under one module name everywhere (`expense`, not `examples.expense`): the types'
module paths are part of the pipeline's fingerprint, which a resumed run must match.
"""

from __future__ import annotations

import hashlib
import threading

import msgspec

import waystation as ws


class Expense(msgspec.Struct, kw_only=True):
    """What an employee submits."""

    id: str
    employee: str
    amount: float
    currency: str = "EUR"
    category: str = "other"
    description: str = ""


class Review(msgspec.Struct, kw_only=True):
    """The automatic review: the amount in EUR and what the approver should look at."""

    amount_eur: float
    within_policy: bool
    notes: list[str]


class Decision(msgspec.Struct, kw_only=True):
    """The manager's answer to the approval gate."""

    approved: bool
    by: str
    comment: str = ""


class Payment(msgspec.Struct, kw_only=True):
    """The run's output."""

    status: str
    """paid or rejected."""
    amount_eur: float
    to: str
    reference: str | None = None


RATES_TO_EUR = {"EUR": 1.0, "USD": 0.92, "GBP": 1.17, "CHF": 1.05}
LIMITS_EUR = {"travel": 2000.0, "meals": 150.0, "equipment": 1500.0, "other": 500.0}


@ws.stage
async def review(expense: Expense) -> Review:
    """Validate the expense and check it against the policy. A bad expense fails the run."""
    if expense.amount <= 0:
        raise ValueError(f"expense {expense.id}: amount must be positive, not {expense.amount}")
    rate = RATES_TO_EUR.get(expense.currency)
    if rate is None:
        raise ValueError(f"expense {expense.id}: currency {expense.currency} is not supported")
    amount_eur = round(expense.amount * rate, 2)
    limit = LIMITS_EUR.get(expense.category, LIMITS_EUR["other"])
    notes = []
    if amount_eur > limit:
        notes.append(f"{amount_eur:.2f} EUR is over the {expense.category} limit of {limit:.2f}")
    if not expense.description:
        notes.append("no description given")
    return Review(amount_eur=amount_eur, within_policy=not notes, notes=notes)


approval = ws.gate(
    "approval",
    schema=Decision,
    reason="a manager approves or rejects the expense (see the review's notes)",
)


class FakeBank:
    """Stands in for a payment API that deduplicates transfers by idempotency key.

    Like a real network, it fails now and then: here, the first call for each key in a
    process times out, so the `pay` stage's retry policy has something to do.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tried: set[str] = set()
        self._done: dict[str, str] = {}

    def transfer(self, *, to: str, amount_eur: float, idempotency_key: str) -> str:
        with self._lock:
            if idempotency_key in self._done:  # a retry of a transfer that went through
                return self._done[idempotency_key]
            if idempotency_key not in self._tried:
                self._tried.add(idempotency_key)
                raise ConnectionError("bank API timed out")
            digest = hashlib.sha256(f"{idempotency_key}:{to}:{amount_eur}".encode()).hexdigest()
            reference = f"TX-{digest[:10].upper()}"
            self._done[idempotency_key] = reference
            return reference


bank = FakeBank()


@ws.stage(retry=ws.Retry(attempts=4, backoff=0.2, retry_on=(ConnectionError,)), timeout=10)
def pay(expense: Expense, review: Review, approval: Decision, ctx: ws.StageContext) -> Payment:
    """Pay an approved expense (sync code: it runs in a worker thread)."""
    if not approval.approved:
        return Payment(status="rejected", amount_eur=review.amount_eur, to=expense.employee)
    reference = bank.transfer(
        to=expense.employee,
        amount_eur=review.amount_eur,
        idempotency_key=ctx.idempotency_key,  # the same on every attempt of this stage
    )
    return Payment(
        status="paid", amount_eur=review.amount_eur, to=expense.employee, reference=reference
    )


expense_pipeline = ws.Pipeline("expense-approval", [review, approval, pay], version="1")

pipelines = [expense_pipeline]
