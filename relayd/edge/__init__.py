"""The edge: where device apps connect over WebSocket (docs/protocol.md section 12)."""
