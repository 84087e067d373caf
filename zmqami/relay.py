"""The relay: what the broker and the agent both do with states, written once.

A process writes to its *local* Asterisk servers (the broker: every server; an agent: its own)
and may hear of *remote* sources (an agent's peers).  Each local server is also a source: what
it reports (an event, a list read) is recorded in the StateTable, and each other local server's
mirror is written; on_change then tells the rest of the network (an agent sends it to its peers).
What a remote source reports is recorded by the program and written with write_mirrors.

Beside that one path: resynchronising a server that is (back) up, reading its lists
(DeviceStateList, PresenceStateList) after a restart and for anti-entropy, showing a source's
devices as down_state while it is down, forgetting a removed one, and deciding the presences
of the first reads together when no state file says which changed last.

Per local server it also knows how its voicemail lamps are written (mwi_write), its filters
(what is taken from it, what is written to it) and, with hinted_only, the names its dialplan
hints show: what it is never written.

A new kind of state is added here (its list read), in rules.py (event -> StateUpdate, and the
action that writes it) and, if its sources' reports combine otherwise, in states.py.
"""
import json
import logging
from typing import Any, Callable, Dict, List, Optional, Pattern, Set

from .asterisk import AsteriskLink
from .rules import (MAILBOX_PREFIX, MAILBOX_WRITES, BadInput, StateUpdate, device_state_update,
                    hinted_names, list_items, listed_lamp, mailbox_update, mirror_variable,
                    presence_update, relayed_update, state_name, state_variable, unique_id)
from .states import ListReading, StateTable, decide_first_presences
from .stats import DropLog, plural, printable

OnChange = Callable[[str, StateUpdate], None]
OnGone = Callable[[str, str], None]
OnRead = Callable[[List[ListReading]], None]


def _nothing(*_: Any) -> None:
    pass


class Relay:
    def __init__(self, states: StateTable, drops: DropLog, log: logging.Logger,
                 device_state: bool, presence: bool, verb: str = "Setvar",
                 mwi: bool = False) -> None:
        self.states = states
        self.drops = drops
        self.log = log
        self.device_state = device_state
        self.presence = presence
        self.mwi = mwi  # voicemail lamps
        # How each local server's lamps are written (rules.MAILBOX_WRITES; external if not said):
        # a server written with MWIUpdate runs res_mwi_external, never app_voicemail, so each
        # MessageWaiting it publishes is the echo of a write, never news.
        self.mwi_write: Dict[str, str] = {}
        # Per local server: only the names (rules.state_name) its publish filter matches are
        # taken from it, and only those its accept filter matches are written to it.
        self.publish_filters: Dict[str, Pattern[str]] = {}
        self.accept_filters: Dict[str, Pattern[str]] = {}
        # Servers written only the Custom: devices and CustomPresence: presentities their own
        # dialplan hints name (hinted_only), and those names, as their ExtensionStateList last
        # showed them (nothing is written before it is read).
        self.hinted_only: Set[str] = set()
        self.hinted: Dict[str, Set[str]] = {}
        self.verb = verb                        # the original agent wrote SetVar, the broker Setvar
        self.links: Dict[str, AsteriskLink] = {}  # local servers, by the source name they report as
        self.on_change: OnChange = _nothing     # a local source's news, for the rest of the network
        self.on_gone: OnGone = _nothing         # a local source's device gone after its restart
        self.traced: Set[str] = set()           # sources whose every event is logged (ami_trace)
        self.verbose = False                    # every action written is logged (verbose_messages)
        self.changes = 0                        # news from local sources
        self.resyncs = 0
        self.presences_read: Set[str] = set()   # local sources whose presences were read this run
        # Without a state file, the broker decides the presences of every server's first read
        # together (decide_first); None when they are not (a state file, or an agent).
        self.first_presences: Optional[Dict[str, Dict[str, str]]] = None
        self.unresolved: Set[str] = set()       # presences the servers disagreed on at start

    # --- a local source's events -------------------------------------------------------------
    def take_event(self, source: str, link: AsteriskLink, event: Dict[str, Any]) -> None:
        """An event from a local server: record what it reports, relay what is news."""
        if source in self.traced:
            self.log.info("Got message from %s:\n%s.", source, json.dumps(event, indent=4))
        name = event.get("Event")
        if name == "Reload":
            self.read_hints(source)  # (its dialplan may have new hints)
            return
        if name == "MessageWaiting" and self._lamp_writes(source) == "MWIUpdate":
            self.log.debug("Ignoring MessageWaiting from %s: the echo of an MWIUpdate", source)
            return
        try:
            update = relayed_update(event, self.device_state, self.presence, self.mwi)
            self.states.check_room(source, update)
        except BadInput as exc:
            self.drops.drop(link.name, f"{event.get('Event')}: {exc}",
                            json.dumps(event).encode("utf-8"))
            return
        if update is None or (self.publish_filters and not self.published(source, update)):
            if self.log.isEnabledFor(logging.DEBUG):  # (printable costs, even for no line)
                self.log.debug("Ignoring event %s from %s", printable(event["Event"]), source)
            return
        # The one place where echoes are recognised beyond the Custom: devices (rules): every
        # presence write is published back, changed or not.
        if update.is_presence and link.is_echo(update):
            self.log.debug("Ignoring %s=%s from %s: the echo of our own write", update.variable,
                           update.value, source)
            return
        if self.states.record(source, update):
            self.unresolved.discard(update.variable)
            self.changes += 1
            self.write_mirrors(update.variable, changed_by=source)
            self.on_change(source, update)

    # --- writing mirrors ------------------------------------------------------------------------
    def write_mirrors(self, variable: str, action_id: str = "", changed_by: str = "") -> None:
        """Write variable on every local server whose mirror of it should change: what the other
        sources report, combined (StateTable.mirror_value).  changed_by: the local source whose
        report changed: its own mirror shows the others' share, which did not (at a start,
        where every server lists the same PJSIP endpoints, that halves the writes)."""
        owner = self.states.owner(variable)
        if owner is None or variable.startswith(MAILBOX_PREFIX):
            # Reported by several sources (each mirror shows the others' share), or a lamp
            # (each server its own way of writing it).
            for source in self.links:
                if source == changed_by:
                    continue
                value = self.states.mirror_value(variable, source)
                if value is not None:
                    self.write(source, StateUpdate(variable, value), action_id)
            return
        # One source reports it (the common case): one value, and one action for all the others.
        choosy = self.accept_filters or self.hinted_only
        targets = [link for source, link in self.links.items()
                   if source != owner and (not choosy or self.accepted(source, variable))]
        if not targets:
            return  # (an agent's own device: its one server is the owner)
        update = StateUpdate(variable, self.states.mirror_value(variable, ""))
        action_id = action_id or unique_id()
        if self.verbose:
            self.log.info("Distribute: %s", json.dumps(update.action(action_id, self.verb),
                                                       indent=1))
        self.log.debug("Relaying %s=%s from %s", variable, update.value, owner)
        encoded = update.encoded_action(action_id, self.verb)  # the same bytes for every server
        for link in targets:
            link.write_state(update, action_id, self.verb, encoded)

    def write(self, source: str, update: StateUpdate, action_id: str = "") -> None:
        """Write update on a local server, the way that server takes it."""
        verb = self._lamp_writes(source) if update.is_mailbox else self.verb
        if verb is not None and self.accepted(source, update.variable):
            self.links[source].write_state(update, action_id or unique_id(), verb)

    def published(self, source: str, update: StateUpdate) -> bool:
        """Whether update may be taken from source (its publish filter)."""
        wanted = self.publish_filters.get(source)
        return wanted is None or wanted.search(state_name(update.variable)) is not None

    def accepted(self, source: str, variable: str) -> bool:
        """Whether variable may be written on source (its accept filter, its hints)."""
        wanted = self.accept_filters.get(source)
        if wanted is not None and wanted.search(state_name(variable)) is None:
            return False
        return source not in self.hinted_only or variable.startswith(MAILBOX_PREFIX) or \
            state_name(variable) in self.hinted.get(source, ())

    def _lamp_writes(self, source: str) -> Optional[str]:
        """The action that writes a lamp on this server: MWIUpdate, VoicemailRefresh or None."""
        return MAILBOX_WRITES[self.mwi_write.get(source, "external")]

    # --- sources down, up, gone -------------------------------------------------------------------
    def source_down(self, source: str) -> List[str]:
        """Its devices show down_state on the local servers until it reports again."""
        variables = self.states.set_down(source)
        for variable in variables:
            self.write_mirrors(variable, changed_by=source)
        return variables

    def source_up(self, source: str) -> List[str]:
        """What it last reported holds again (over NATS the bucket brings each change)."""
        variables = self.states.set_up(source)
        for variable in variables:
            self.write_mirrors(variable, changed_by=source)
        return variables

    def forget_source(self, source: str) -> List[str]:
        """A source gone for good: its devices show down_state one last time where nobody else
        reports them, then nothing it reported is known any more."""
        variables = self.states.remove_source(source)
        for variable in variables:
            self.write_mirrors(variable)
        self.states.forget(variables, source)
        return variables

    # --- resynchronisation and lists --------------------------------------------------------------
    def resync(self, source: str) -> bool:
        """A local server is (back) up: write every known state of the others on it.  Until its
        presences have been read once in this run, none is written to it: one may have changed
        while this process was stopped (StateFile, decide_first).  Returns whether this is its
        first read (for read_lists)."""
        first = source not in self.presences_read
        self.resyncs += 1
        link, written = self.links[source], 0
        for update in self.states.mirrors_for(source):
            if not (first and update.is_presence) and update.variable not in self.unresolved:
                self.write(source, update)
                written += 1
        self.log.info("Resynchronising %s: %d known states written, reading its states",
                      link.name, written)
        return first

    def read_lists(self, source: str, repair: bool, first: bool = False,
                   on_read: OnRead = _nothing) -> None:
        """Read a local server's lists: after its (re)start (repair False) or for anti-entropy;
        on_read gets the readings once every list is in (a failed read is tried again by the
        link until it succeeds)."""
        link = self.links[source]
        wanted = int(self.device_state) + int(self.presence) + int(self.mwi)
        readings: List[ListReading] = []

        def done(reading: ListReading) -> None:
            readings.append(reading)
            if len(readings) == wanted:
                on_read(readings)

        if self.device_state:
            link.read_list("DeviceStateList", lambda reply, asked_at: done(
                self.on_device_list(source, reply, asked_at, repair)))
        if self.presence:
            link.read_list("PresenceStateList", lambda reply, asked_at: done(
                self.on_presence_list(source, reply, asked_at, repair or first)))
        self.read_hints(source)
        if self.mwi and self._lamp_writes(source) == "MWIUpdate":  # what it holds
            link.read_list("MWIGet", lambda reply, asked_at: done(
                self.on_lamps_held(source, reply)), fields={"Mailbox": "/.*/"})
        elif self.mwi:  # its own mailboxes
            link.read_list("VoicemailUsersList", lambda reply, asked_at: done(
                self.on_mailbox_list(source, reply, asked_at)))
        if not wanted:
            on_read(readings)

    def read_hints(self, source: str) -> None:
        """With hinted_only: read which names the server's hints show (ExtensionStateList)."""
        if source in self.hinted_only:
            self.links[source].read_list("ExtensionStateList", lambda reply, asked_at:
                                         self.on_hints(source, reply))

    def on_hints(self, source: str, reply: List[Dict[str, Any]]) -> None:
        """What its hints name now: a name newly hinted gets its state at once."""
        names: Set[str] = set()
        for item in list_items(reply, "ExtensionStatus"):
            names |= hinted_names(item.get("Hint"))
        new, self.hinted[source] = names - self.hinted.get(source, set()), names
        for name in sorted(new):
            variable = state_variable(name)
            value = self.states.mirror_value(variable, source)
            if value is not None:
                self.write(source, StateUpdate(variable, value))
        if new:
            self.log.info("The hints of %s name %d more devices and presences: written",
                          self.links[source].name, len(new))

    def on_device_list(self, source: str, reply: List[Dict[str, Any]], asked_at: float,
                       repair: bool) -> ListReading:
        link = self.links[source]
        own, mirrors = [], []
        for item in list_items(reply, "DeviceStateChange"):
            mirror = mirror_variable(item)
            if mirror is not None:
                mirrors.append((mirror, str(item.get("State")).upper()))
                continue
            update = self._parsed(link, item, device_state_update)
            if update is not None and self.published(source, update):
                own.append(update)
        reading = self.states.read_device_list(source, own, mirrors, asked_at,
                                               link.outbox.is_unsettled, self._refused(link),
                                               after_restart=not repair)
        self.apply_reading(source, reading, "devices")
        return reading

    def on_presence_list(self, source: str, reply: List[Dict[str, Any]], asked_at: float,
                         repair: bool) -> ListReading:
        """While the first presences are decided together (no state file), every list read is
        one of them, whenever it was asked for: an anti-entropy read answered before a server's
        first one (a short resync_interval, a busy machine) must not take its value for a change
        over the others'.  Afterwards, at the first contact, a difference from the saved
        presence is news (repair)."""
        if self.first_presences is not None:
            self.gather_presences(source, reply)
            return ListReading()
        self.presences_read.add(source)
        link = self.links[source]
        reading = self.states.read_presence_list(
            source, self._presences(source, reply), asked_at, after_restart=not repair,
            writing=link.outbox.is_unsettled, on_refused=self._refused(link))
        self.apply_reading(source, reading, "presences")
        return reading

    def on_lamps_held(self, source: str, reply: List[Dict[str, Any]]) -> ListReading:
        """An MWIGet of a server written with MWIUpdate: its lamps that show wrong counts."""
        held = {update.variable: update.value for update in self._lamps(source, reply, "MWIGet")}
        link = self.links[source]
        reading = self.states.read_lamps_held(source, held, link.outbox.is_unsettled)
        self.apply_reading(source, reading, "voicemail lamps")
        return reading

    def on_mailbox_list(self, source: str, reply: List[Dict[str, Any]],
                        asked_at: float) -> ListReading:
        """A VoicemailUsersList of a voicemail server: its mailboxes' counts, each a change if it
        differs from what is known (a voicemail server's counts are never stale)."""
        listed = [update for update in self._lamps(source, reply, "VoicemailUserEntry")
                  if self.published(source, update)]
        link = self.links[source]
        reading = self.states.read_presence_list(source, listed, asked_at, after_restart=False,
                                                 writing=link.outbox.is_unsettled,
                                                 on_refused=self._refused(link))
        self.apply_reading(source, reading, "mailboxes")
        return reading

    def _lamps(self, source: str, reply: List[Dict[str, Any]], event: str) -> List[StateUpdate]:
        updates = (self._parsed(self.links[source], listed_lamp(item), mailbox_update)
                   for item in list_items(reply, event))
        return [update for update in updates if update is not None]

    def apply_reading(self, source: str, reading: ListReading, what: str) -> None:
        """What a list showed: its news written on the other local servers (the rest of the
        network hears of it from the program: an agent sends all its states), its mirrors
        repaired, its devices gone shown down."""
        link = self.links[source]
        for update in reading.changed:
            if update.variable not in self.unresolved:
                self.write_mirrors(update.variable, changed_by=source)
        for update in reading.repairs:
            self.write(source, update)
        for variable in reading.gone:
            self.write_mirrors(variable, changed_by=source)
            self.on_gone(source, variable)
        if reading.changed or reading.repairs:
            self.log.info("Read the %s of %s: %d states relayed, %d mirrors repaired", what,
                          link.name, len(reading.changed), len(reading.repairs))
        if reading.gone:
            self.log.warning("%s of %s that its list no longer shows after its restart: now %s "
                             "elsewhere, until they report again",
                             plural(len(reading.gone), "device"), link.name,
                             self.states.down_state)

    def _parsed(self, link: AsteriskLink, item: Dict[str, Any],
                parse: Callable[[Dict[str, Any]], Optional[StateUpdate]]) -> Optional[StateUpdate]:
        """A list item as the update it reports (None: not one that is relayed); an item that
        Asterisk would not list is dropped, counted and logged."""
        try:
            return parse(item)
        except BadInput as exc:
            self.drops.drop(link.name, f"list item: {exc}", repr(item).encode())
            return None

    def _presences(self, source: str, reply: List[Dict[str, Any]]) -> List[StateUpdate]:
        updates = (self._parsed(self.links[source], item, presence_update)
                   for item in list_items(reply, "PresenceStateChange"))
        return [update for update in updates
                if update is not None and self.published(source, update)]

    def _refused(self, link: AsteriskLink) -> Callable[[StateUpdate, str], None]:
        return lambda update, why: self.drops.drop(link.name, f"list item: {why}",
                                                   update.variable.encode())

    # --- the first presences, without a state file --------------------------------------------
    def gather_presences(self, source: str, reply: List[Dict[str, Any]]) -> None:
        """A server's first presence list: kept until every server's is in."""
        self.first_presences[source] = {update.variable: update.value for update in
                                        self._presences(source, reply)}
        self.presences_read.add(source)
        if set(self.first_presences) >= set(self.links):
            self.decide_first()

    def decide_first(self) -> None:
        """Decide the first presences with what has been read (all servers', or at the deadline
        those that answered)."""
        if self.first_presences is None:
            return
        first, self.first_presences = self.first_presences, None
        decided, unresolved = decide_first_presences(first)
        for variable, (source, value) in decided.items():
            update = StateUpdate(variable, value)
            if self.states.expected(variable) is None and self.states.record(source, update):
                self.write_mirrors(variable, changed_by=source)
        self.unresolved.update(unresolved)
        if unresolved:
            self.log.warning("%d presences differ between the servers and, without a "
                             "state_file, it cannot be told which changed last: each server "
                             "keeps its own until the next change (%s)", len(unresolved),
                             ", ".join(unresolved[:3]))
