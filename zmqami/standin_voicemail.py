"""The stand-in Asterisk's voicemail lamps (MWI), as the captures of two Asterisk 22 servers show
them (docs/protocol.md, section 5; tests/captures/mwi):

- role ``voicemail``: app_voicemail.  A mailbox's counts change as messages arrive, are read or
  deleted (set_mailbox: what the spool holds); a poll publishes MessageWaiting for mailboxes a
  phone subscribes to, VoicemailRefresh for any mailbox, and only when the counts changed.
  MailboxCount, MailboxStatus and VoicemailUsersList read them.  The MWI* actions do not exist.
- role ``external``: res_mwi_external with res_mwi_external_ami.  MWIUpdate and MWIDelete set
  what it holds (kept in its database across restarts) and publish a MessageWaiting each time,
  changed or not: nothing in it tells which server the counts came from.  MWIGet lists them.
- no role: no voicemail module; MailboxCount and the MWI* actions do not exist.

Each MessageWaiting is followed by a DeviceStateChange of ``MWI:<mailbox>`` when the lamp (New
above 0) goes on or off.
"""
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

Headers = Dict[str, str]
Reply = Optional[List[Dict[str, str]]]
UNSIGNED = 2 ** 32  # counts are read with sscanf("%u"): -1 is stored as 4294967295

VOICEMAIL_ACTIONS = ("mailboxcount", "mailboxstatus", "voicemailuserslist", "voicemailrefresh")
EXTERNAL_ACTIONS = ("mailboxcount", "mailboxstatus", "mwiget", "mwiupdate", "mwidelete")
# A VoicemailUserEntry's fields after VMContext and VoiceMailbox, as app_voicemail writes them.
USER_ENTRY = (("Email", "(null)"), ("Pager", ""), ("ServerEmail", "asterisk"),
              ("FromString", ""), ("MailCommand", "/usr/sbin/sendmail -t"), ("Language", ""),
              ("TimeZone", ""), ("Callback", ""), ("Dialout", ""), ("UniqueID", ""),
              ("ExitContext", ""), ("SayDurationMinimum", "2"), ("SayEnvelope", "Yes"),
              ("SayCID", "No"), ("AttachMessage", "No"), ("AttachmentFormat", ""),
              ("DeleteMessage", "No"), ("VolumeGain", "0.00"), ("CanReview", "No"),
              ("CanMarkUrgent", "Yes"), ("CallOperator", "No"), ("MaxMessageCount", "100"),
              ("MaxMessageLength", "0"))


def full_id(mailbox: str) -> str:
    """app_voicemail's mailbox id: 100 is 100@default."""
    return mailbox if "@" in mailbox else f"{mailbox}@default"


def scan_unsigned(text: str) -> Optional[int]:
    """sscanf("%u"), as res_mwi_external_ami reads a count: leading digits (a sign allowed,
    wrapped), the rest ignored; None when there are none."""
    match = re.match(r"\s*([+-]?)(\d+)", text)
    if match is None:
        return None
    value = int(match.group(2)) % UNSIGNED
    return (UNSIGNED - value) % UNSIGNED if match.group(1) == "-" else value


def signed(value: int) -> int:
    return value - UNSIGNED if value >= UNSIGNED // 2 else value


class Voicemail:
    def __init__(self, role: Optional[str], publish: Callable[[Dict[str, Any]], None],
                 response: Callable[..., Dict[str, str]], save: Callable[[], None]) -> None:
        self.role = role  # "voicemail", "external" or None
        self.publish = publish
        self.response = response
        self.save = save  # the database changed (external counts survive a restart)
        # voicemail: mailbox id -> (new, old, urgent) in the spool, and what was last published;
        # external: mailbox id -> (new, old) as stored.
        self.spool: Dict[str, Tuple[int, int, int]] = {}
        self.published: Dict[str, Tuple[int, int]] = {}
        self.stored: Dict[str, Tuple[int, int]] = {}
        self.subscribed: Optional[set] = None  # voicemail: mailboxes phones subscribe to (None: all)
        self.lamps: Dict[str, bool] = {}

    def handler(self, action: str) -> Optional[Callable[[Headers], Reply]]:
        actions = {"voicemail": VOICEMAIL_ACTIONS, "external": EXTERNAL_ACTIONS}.get(self.role, ())
        return getattr(self, "_action_" + action) if action in actions else None

    # --- what happens to mailboxes ----------------------------------------------------------------
    def set_mailbox(self, mailbox: str, new: int, old: int, urgent: int = 0,
                    poll: bool = True) -> None:
        """voicemail: the spool now holds these; poll: app_voicemail's poll runs (it publishes
        only for a mailbox a phone subscribes to)."""
        mailbox = full_id(mailbox)
        self.spool[mailbox] = (new, old, urgent)
        if poll and (self.subscribed is None or mailbox in self.subscribed):
            self._publish_if_changed(mailbox)

    def _publish_if_changed(self, mailbox: str) -> bool:
        new, old, urgent = self.spool.get(mailbox, (0, 0, 0))
        counts = (new + urgent, old)  # (New counts INBOX and Urgent)
        if self.published.get(mailbox, (0, 0)) == counts:
            return False
        self.published[mailbox] = counts
        self.message_waiting(mailbox, counts[0], old, waiting=counts[0] > 0)
        return True

    def message_waiting(self, mailbox: str, new: int, old: int, waiting: bool) -> None:
        self.publish({"Event": "MessageWaiting", "Privilege": "call,all", "Mailbox": mailbox,
                      "Waiting": "1" if waiting else "0", "New": str(signed(new)),
                      "Old": str(signed(old))})
        lamp = signed(new) > 0
        if self.lamps.get(mailbox, False) != lamp:
            self.lamps[mailbox] = lamp
            self.publish({"Event": "DeviceStateChange", "Privilege": "call,all",
                          "Device": f"MWI:{mailbox}", "State": "INUSE" if lamp else "NOT_INUSE"})

    def counts(self, mailbox: str) -> Tuple[int, int, int]:
        """(new, old, urgent) as MailboxCount answers them."""
        if self.role == "external":
            new, old = self.stored.get(mailbox, (0, 0))
            return new, old, 0
        return self.spool.get(full_id(mailbox), (0, 0, 0))

    # --- app_voicemail's actions (and res_mwi_external's MailboxCount, MailboxStatus) -----------
    def _action_mailboxcount(self, headers: Headers) -> Reply:
        mailbox = headers.get("mailbox", "")
        if not mailbox:
            return [self.response(headers, "Error", Message="Mailbox not specified")]
        new, old, urgent = self.counts(mailbox)
        return [self.response(headers, "Success", Message="Mailbox Message Count",
                              Mailbox=mailbox, UrgMessages=str(urgent), NewMessages=str(new),
                              OldMessages=str(old))]

    def _action_mailboxstatus(self, headers: Headers) -> Reply:
        mailbox = headers.get("mailbox", "")
        if not mailbox:
            return [self.response(headers, "Error", Message="Mailbox not specified")]
        new, _, urgent = self.counts(mailbox)
        return [self.response(headers, "Success", Message="Mailbox Status", Mailbox=mailbox,
                              Waiting="1" if new + urgent > 0 else "0")]

    def _action_voicemailuserslist(self, headers: Headers) -> Reply:
        action_id = {"ActionID": headers["actionid"]} if "actionid" in headers else {}
        reply = [self.response(headers, "Success", EventList="start",
                               Message="Voicemail user list will follow")]
        for mailbox in sorted(self.spool):
            box, context = mailbox.split("@", 1)
            new, old, urgent = self.spool[mailbox]
            reply.append({"Event": "VoicemailUserEntry", **action_id, "VMContext": context,
                          "VoiceMailbox": box, "Fullname": f"Mailbox {box}", **dict(USER_ENTRY),
                          "NewMessageCount": str(new + urgent), "OldMessageCount": str(old)})
        reply.append({"Event": "VoicemailUserEntryComplete", **action_id, "EventList": "Complete",
                      "ListItems": str(len(reply) - 1)})
        return reply

    def _action_voicemailrefresh(self, headers: Headers) -> Reply:
        """Re-count a mailbox (Context and Mailbox; none: every mailbox): a MessageWaiting for
        each whose counts changed, after the response."""
        mailbox, context = headers.get("mailbox", ""), headers.get("context", "") or "default"
        wanted = [f"{mailbox}@{context}"] if mailbox else list(self.spool)
        reply = [self.response(headers, "Success", Message="Refresh sent")]
        for box in wanted:
            self._publish_if_changed(box)
        return reply

    # --- res_mwi_external_ami's actions --------------------------------------------------------
    def _action_mwiupdate(self, headers: Headers) -> Reply:
        mailbox = headers.get("mailbox", "")
        if not mailbox:
            return self._missing_mailbox(headers)
        values = []
        for name in ("NewMessages", "OldMessages"):
            text = headers.get(name.lower(), "")
            value = scan_unsigned(text) if text else 0
            if value is None:
                return [self.response(headers, "Error", Message=f"Invalid {name}: {text}")]
            values.append(value)
        self.stored[mailbox] = (values[0], values[1])
        self.save()
        self.message_waiting(mailbox, values[0], values[1], waiting=values[0] > 0)
        return [self.response(headers, "Success")]

    def _action_mwidelete(self, headers: Headers) -> Reply:
        mailbox = headers.get("mailbox", "")
        if not mailbox:
            return self._missing_mailbox(headers)
        for box in self._selected(mailbox):
            del self.stored[box]
            self.message_waiting(box, 0, 0, waiting=False)
        self.save()
        return [self.response(headers, "Success")]

    def _action_mwiget(self, headers: Headers) -> Reply:
        mailbox = headers.get("mailbox", "")
        if not mailbox:
            return self._missing_mailbox(headers)
        action_id = {"ActionID": headers["actionid"]} if "actionid" in headers else {}
        reply = [self.response(headers, "Success", EventList="start",
                               Message="Mailboxes will follow")]
        for box in self._selected(mailbox):
            new, old = self.stored[box]
            reply.append({"Event": "MWIGet", "Mailbox": box, "OldMessages": str(old),
                          "NewMessages": str(new), **action_id})  # (the ActionID last)
        reply.append({"Event": "MWIGetComplete", **action_id, "EventList": "Complete",
                      "ListItems": str(len(reply) - 1)})
        return reply

    def _missing_mailbox(self, headers: Headers) -> Reply:
        return [self.response(headers, "Error", Message="Missing mailbox parameter in request")]

    def _selected(self, mailbox: str) -> List[str]:
        """The stored mailboxes an id or a /regex/ names, sorted (an invalid regex: none)."""
        if len(mailbox) > 1 and mailbox.startswith("/") and mailbox.endswith("/"):
            try:
                pattern = re.compile(mailbox[1:-1])
            except re.error:
                return []
            return sorted(box for box in self.stored if pattern.search(box))
        return [mailbox] if mailbox in self.stored else []
