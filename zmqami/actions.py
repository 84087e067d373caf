"""Which AMI actions others may have an agent run on its Asterisk (ALLOWED_ACTIONS)."""
from typing import Any, Dict, Iterable

from .rules import BadInput, safe_action


class ActionGate:
    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = {name.lower() for name in allowed}

    def check(self, data: Any, crashing: frozenset) -> Dict[str, str]:
        """The action to send, checked as Asterisk will read it (rules.safe_action: nothing
        that crashes it the way it is reached, no injected headers); BadInput saying why not."""
        action = safe_action(data, crashing)
        if action["Action"].lower() not in self.allowed:
            raise BadInput(f"{action['Action']} is not allowed on this node (ALLOWED_ACTIONS)")
        return action
