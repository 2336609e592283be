"""GoHighLevel integration: OAuth installs, tokens, signed webhooks → subaccounts and message usage.

``client`` (the one API gateway) · ``tokens`` (encrypted store, locked refresh) · ``oauth`` (install and
callback routes) · ``installs`` / ``locations`` (install state, subaccounts) · ``signatures`` /
``webhooks`` / ``events`` (verify, store, dispatch) · ``jobs`` / ``cli`` (token refresh, replay) ·
``sso`` (custom-page SSO, owned by the portal). ghl imports billing, never the other way round.
"""
