"""The LAN (internal): mDNS announce/browse (``discovery``) and the fleet search
algorithm (``fleet``). ``browse`` and ``fleet_search`` are public through ``edge_agent``.
"""
