"""Account linking: a household links its vendor account to a cloud connector (OAuth2 authorization code + PKCE).

* ``flow``    -- pure: state and PKCE values, the authorization URL, the callback's parameters, the token
  endpoint's answers and the granted scope (never wider than IIM's three).
* ``sealing`` -- tokens and code verifiers encrypted at rest (AES-256-GCM bound to tenant, row and column).
* ``oauth``   -- the HTTP driver: token exchange, refresh and revocation (RFC 7009), each under a deadline.
* ``store``   -- ``iim.link_state`` and ``iim.account_link`` (migration 0027).
* ``service`` -- start, callback, status, revoke, tokens for connectors, the refresher.
* ``http``    -- the callback page on IIM's HTTP site (``GET /oauth2/callback``).
"""
