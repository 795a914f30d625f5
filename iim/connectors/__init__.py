"""Smart-home connectors: the contract, the plugin loader and the shipped webhook/REST connector.

* ``contract`` -- what a connector offers and what it is given (``ConnectorContext``); vendor-neutral.
* ``registry`` -- entry-point discovery (``iim.connectors``), config validation, paired setup/unload.
* ``webhook``  -- the universal webhook/REST connector (signing, OAuth2, retries, circuit breaker).
* ``breaker``  -- the circuit breaker, pure bookkeeping.
* ``http``     -- the ``GET /v1/connectors`` handler and the vendors' user-action callback sub-app.
* ``metrics``  -- ``iim_connector_requests``, ``iim_connector_breaker_state`` (up/down is ``/health``'s
  ``iim_dependency_up``).
"""
