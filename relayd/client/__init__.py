"""What a device app or a business integration imports to speak the relayd contract."""

from relayd.client.business import parse_event, reply
from relayd.client.device import DeviceKeys, RelayPublic

__all__ = ["DeviceKeys", "RelayPublic", "parse_event", "reply"]
