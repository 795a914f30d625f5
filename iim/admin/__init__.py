"""Operator tooling for the registry: the admin HTTP API (``/v1``) and the ``iim`` CLI sub-commands.

Entry points for wiring:

* ``iim.admin.api.create_registry_app(pool_provider, settings, directory_pool=...)`` and
  ``iim.admin.api.mount_registry(root_app, registry_app)`` -- the API on the service's HTTP port;
* ``iim.admin.cli.register_subcommands(subparsers)`` -- ``iim tenant|household|...|db`` commands.

Module map (one responsibility each):

* ``problems``  -- RFC 9457 problem details with a stable ``error_id``; the error hierarchy.
* ``auth``      -- principals and their grants (role per tenant, brand/region); static bearer tokens (SHA-256).
* ``token_source`` -- the static token table, read again when its file changes (a bad one is refused).
* ``jwks``      -- the OIDC issuer's keys: discovery, fetch with a deadline, cache, rate-limited refetch.
* ``oidc``      -- bearer JWTs verified (pyjwt) and their roles claim mapped to grants.
* ``authn``     -- who is calling: static token first, then a JWT; one 401 for every failure.
* ``settings``  -- ``IIM_ADMIN_*`` settings (token table reference, body and page limits).
* ``bodies``    -- size-limited, strict JSON request bodies and query strings, validated by pydantic.
* ``resources`` -- the registry collections, generated from ``policy_cache.registry``'s table specs.
* ``service``   -- tenant-scoped transactions and the store-error -> problem mapping.
* ``views``     -- request handlers: validate, call the service, shape the response.
* ``routing``   -- the ``Route`` description shared by the app and the OpenAPI generator.
* ``routes``    -- the route table built from ``resources``.
* ``openapi``   -- the OpenAPI 3.1 document generated from the route table and the models.
* ``api``       -- the aiohttp application factory, middleware and authentication guard.
* ``client``    -- a small synchronous HTTP client for the CLI.
* ``cli``       -- the ``iim`` sub-commands.
"""
