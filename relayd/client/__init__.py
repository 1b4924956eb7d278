"""What a device app or a business integration imports to speak the relayd contract."""

from relayd.client.business import RECEIPTS, parse_event, reply
from relayd.client.device import DeviceKeys, RelayPublic
from relayd.client.edge import EdgeClosedError, EdgeDevice, EdgeRefusedError
from relayd.client.identity import IdentityService, enrol
from relayd.client.rich import (
    Item,
    ListPicker,
    Option,
    QuickReply,
    Reaction,
    Response,
    RichLink,
    Section,
    Slot,
    TimePicker,
    parse_body,
)

__all__ = ["RECEIPTS", "DeviceKeys", "EdgeClosedError", "EdgeDevice", "EdgeRefusedError",
           "IdentityService", "Item", "ListPicker", "Option", "QuickReply", "Reaction",
           "RelayPublic", "Response", "RichLink", "Section", "Slot", "TimePicker", "enrol",
           "parse_body", "parse_event", "reply"]
