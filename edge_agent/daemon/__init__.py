"""The daemon (internal): the composition root (``app``), the embed service and its
scheduler (``service``), the index methods (``index_service``), the socket server (``server``),
metrics, systemd notification and the service installer. Nothing here is public API: callers
talk to the daemon over the wire (``edge_agent.client``) or run it with ``edge-agent serve``.
"""
