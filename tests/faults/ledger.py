"""The checker: what each phase sent, what came out where, and the table per fault.

Units are counted per direction:
- up: one per message a device sent; delivered when its event reached the business.
- down: one per (device, message id) the relay owes a device: echoes of the user's own
  messages to their other devices, and every business reply to every device of the user.
A unit that is not delivered must be accounted for by a dead-letter with a reason (in
relayd.dead) or, for a reply, an error event in the business's inbox; anything else is
lost. Copies beyond the first are duplicates, and a duplicate must carry the same id (and,
at a device, the same `seq`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

# What tests/faults/conftest.py prints at the end of the run: the table and notes under it.
ROWS: list[Row] = []
NOTES: list[str] = []


@dataclass
class Row:
    phase: str
    direction: str
    sent: int = 0
    delivered: int = 0
    dead: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    duplicated: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Up:
    phase: str
    device: str
    user: str
    kind: str


@dataclass(frozen=True, slots=True)
class Down:
    phase: str
    source: str  # the up message (echo) or the reply it comes from


class Ledger:
    """Filled by the parties as they send and receive; read by `rows`."""

    def __init__(self) -> None:
        self.up: dict[str, Up] = {}
        self.down: dict[tuple[str, str], Down] = {}
        self.ups_of: dict[str, list[str]] = defaultdict(list)  # phase -> up ids
        self.downs_of: dict[str, list[tuple[str, str]]] = defaultdict(list)  # phase -> units
        self.replies: dict[str, str] = {}  # reply id -> phase
        self.at_business: Counter[str] = Counter()  # event id -> copies received
        self.at_device: dict[tuple[str, str], list[int]] = defaultdict(list)  # seqs received
        self.errors: dict[str, str] = {}  # reply id -> error code the business received
        self.receipts: Counter[str] = Counter()  # reply id -> delivered/expired received
        self.dead: dict[str, Counter[str]] = defaultdict(Counter)  # id -> reasons
        self.resent: Counter[str] = Counter()  # publishes repeated after a lost confirm
        self.replayed: set[str] = set()  # envelopes published twice on purpose
        self.unexpected: Counter[str] = Counter()  # what no phase sent
        self.business_order: list[str] = []  # up ids, in the order they first arrived
        self.device_order: dict[str, list[str]] = defaultdict(list)  # ids, first arrivals
        self.changed = asyncio.Event()

    # --- recording ---------------------------------------------------------------------

    def sent_up(self, message_id: str, up: Up, others: list[str]) -> None:
        self.up[message_id] = up
        self.ups_of[up.phase].append(message_id)
        if up.kind in ("start", "message", "close"):  # echoed to the user's other devices
            for device in others:
                self._owe(device, message_id, Down(up.phase, message_id))

    def sent_reply(self, reply_id: str, phase: str, devices: list[str]) -> None:
        self.replies[reply_id] = phase
        for device in devices:
            self._owe(device, reply_id, Down(phase, reply_id))

    def _owe(self, device: str, message_id: str, down: Down) -> None:
        if (device, message_id) not in self.down:
            self.down[device, message_id] = down
            self.downs_of[down.phase].append((device, message_id))

    def business_got(self, event: dict[str, object]) -> None:
        event_id = str(event.get("id"))
        if event.get("type") in ("delivered", "expired"):  # contract 1.4: of a reply of ours
            if str(event.get("ref")) not in self.replies:
                self.unexpected["business:" + str(event.get("type"))] += 1
            self.receipts[str(event.get("ref"))] += 1
            self._changed()
            return
        if event.get("type") == "error":
            self.errors[str(event.get("ref"))] = str(event.get("code"))
        elif event_id not in self.up:
            self.unexpected["business:" + str(event.get("type"))] += 1
        if not self.at_business[event_id]:
            self.business_order.append(event_id)
        self.at_business[event_id] += 1
        self._changed()

    def device_got(self, device: str, message: dict[str, object]) -> None:
        key = (device, str(message.get("id")))
        if key not in self.down:
            self.unexpected["device:" + str(message.get("type"))] += 1
        seq = message.get("seq")
        if not self.at_device[key]:
            self.device_order[device].append(key[1])
        self.at_device[key].append(seq if isinstance(seq, int) else -1)
        self._changed()

    def dead_lettered(self, message_id: str | None, reason: str) -> None:
        if message_id is None or (message_id not in self.up and message_id not in self.replies):
            self.unexpected["dead:" + reason] += 1
        self.dead[str(message_id)][reason] += 1
        self._changed()

    def _changed(self) -> None:
        self.changed.set()

    # --- reading -------------------------------------------------------------------------

    def _up_outcome(self, message_id: str) -> str | None:
        if self.at_business[message_id]:
            return "delivered"
        reasons = self.dead.get(message_id)
        return f"dead:{next(iter(reasons))}" if reasons else None

    def _down_outcome(self, key: tuple[str, str], down: Down) -> str | None:
        if self.at_device.get(key):
            return "delivered"
        if down.source in self.errors:
            return f"rejected:{self.errors[down.source]}"
        reasons = self.dead.get(down.source)
        return f"dead:{next(iter(reasons))}" if reasons else None

    def pending(self, phase: str) -> int:
        """How many units of `phase` have no outcome yet."""
        return (sum(self._up_outcome(i) is None for i in self.ups_of[phase])
                + sum(self._down_outcome(k, self.down[k]) is None for k in self.downs_of[phase]))

    async def until(self, check: Callable[[], bool], wait: float) -> None:
        """Until `check()` holds, woken by each record; TimeoutError after `wait` s."""
        async with asyncio.timeout(wait):
            while not check():
                self.changed.clear()
                await self.changed.wait()

    async def settled(self, phase: str, wait: float) -> None:
        """Until every unit of `phase` has an outcome, or `wait` seconds passed."""
        with contextlib.suppress(TimeoutError):
            await self.until(lambda: not self.pending(phase), wait)

    def missing(self, phase: str) -> list[str]:
        """The units of `phase` without an outcome, described for a failure message."""
        return ([f"up {i} from {self.up[i].device} ({self.up[i].kind})"
                 for i in self.ups_of[phase] if self._up_outcome(i) is None]
                + [f"down {i} to {d} (from {'a reply' if i in self.replies else 'an echo'})"
                   for d, i in self.downs_of[phase] if self._down_outcome((d, i), self.down[d, i])
                   is None])

    def arrived(self, phase: str) -> int:
        """How many up messages of `phase` reached the business."""
        return sum(1 for i in self.ups_of[phase] if self.at_business[i])

    def rows(self, phase: str) -> tuple[Row, Row]:
        up, down = Row(phase, "up"), Row(phase, "down")
        for message_id in self.ups_of[phase]:
            up.sent += 1
            up.duplicated += max(0, self.at_business[message_id] - 1)
            self._count(up, self._up_outcome(message_id))
        for key in self.downs_of[phase]:
            down.sent += 1
            down.duplicated += max(0, len(self.at_device.get(key, [])) - 1)
            self._count(down, self._down_outcome(key, self.down[key]))
        return up, down

    @staticmethod
    def _count(row: Row, outcome: str | None) -> None:
        if outcome == "delivered":
            row.delivered += 1
        elif outcome is None:
            row.lost += 1
        else:
            row.dead[outcome.partition(":")[2]] += 1

    def seq_conflicts(self, phase: str) -> list[str]:
        """(device, id) pairs received with two different seqs, and seqs a device got
        for two different ids: state that was applied twice."""
        problems = []
        by_seq: dict[tuple[str, int], set[str]] = defaultdict(set)
        for (device, message_id), seqs in self.at_device.items():
            if len(set(seqs)) > 1 and self.down.get((device, message_id), Down("", "")).phase \
                    == phase:
                problems.append(f"{message_id[:8]} at {device}: seqs {sorted(set(seqs))}")
            for seq in set(seqs):
                by_seq[device, seq].add(message_id)
        problems += [f"{device} seq {seq}: {len(ids)} ids" for (device, seq), ids
                     in by_seq.items() if len(ids) > 1]
        return problems

    def reordered(self, phase: str) -> list[str]:
        """The lanes of `phase` whose first arrivals came out of the order sent: a device's
        up messages at the business, and at each device the replies of its conversation
        and the echoes of each other device (each a lane of its own, numbered in its order:
        seqs of different lanes may interleave)."""
        position = {message_id: n for n, message_id in enumerate(self.business_order)}
        ups: dict[str, list[int]] = defaultdict(list)
        for message_id in self.ups_of[phase]:
            if message_id in position:
                ups[self.up[message_id].device].append(position[message_id])
        problems = [f"up from {device}" for device, got in ups.items() if got != sorted(got)]
        for device, ids in self.device_order.items():
            lanes: dict[str, list[int]] = defaultdict(list)
            for message_id in ids:
                if self.down.get((device, message_id), Down("", "")).phase == phase:
                    lane = ("replies" if message_id in self.replies
                            else f"echoes of {self.up[message_id].device}")
                    lanes[lane].append(self.at_device[device, message_id][0])
            problems += [f"{lane} to {device}: seqs {seqs}" for lane, seqs in lanes.items()
                         if seqs != sorted(seqs)]
        return problems

    def dead_copies_of_delivered(self, phase: str) -> Counter[str]:
        """Reasons of dead-lettered copies of up messages that were delivered anyway."""
        found: Counter[str] = Counter()
        for message_id in self.ups_of[phase]:
            if self.at_business[message_id]:
                found.update(self.dead.get(message_id, Counter()))
        return found


def table(rows: list[Row]) -> list[str]:
    """The rows as fixed-width text, one line per row."""
    head = ("fault", "dir", "sent", "delivered", "dead-lettered/rejected (reason)", "lost",
            "dup", "notes")
    cells = [head] + [
        (r.phase if r.direction == "up" else "", r.direction, str(r.sent), str(r.delivered),
         ", ".join(f"{reason}: {n}" for reason, n in sorted(r.dead.items())) or "-",
         str(r.lost), str(r.duplicated), "; ".join(r.notes))
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head) - 1)]
    return ["  ".join(c[i].ljust(w) if i in (0, 1, 4) else c[i].rjust(w)
                      for i, w in enumerate(widths)) + "  " + c[-1] for c in cells]
