"""The on-site SAS token server: `plcbridge token-server --config FILE`.

It runs in a site's DMZ, holds the device keys, and issues short-lived SAS tokens to the
gateways on an allow-list, so that no device key rests on a gateway. docs/token-server.md
describes it.
"""
