"""The OAuth2 redirect endpoint on IIM's HTTP site: ``GET /oauth2/callback`` (the household's browser lands here).

A small HTML page, never a stack trace: 200 linked; 400 for anything that links nothing (an unknown, used or
expired state and a malformed query get the same words, so the page is no oracle for states); 503 with
``Retry-After`` while PostgreSQL or the vendor's authorization server is away (nothing was consumed: reloading
works). The page echoes nothing of the request.
"""

from __future__ import annotations

import html
import logging

from aiohttp import web

from iim.linking.service import CallbackRefused, LinkingService, LinkingUnavailable

__all__ = ["CALLBACK_PATH", "LINKING_KEY", "callback_routes"]

log = logging.getLogger(__name__)

CALLBACK_PATH = "/oauth2/callback"
LINKING_KEY = web.AppKey("account_linking", LinkingService)
_MAX_QUERY = 4096

_PAGES = {
    "linked": (200, "Account linked", "Your account is now linked. You can close this page."),
    "invalid": (400, "Link not valid", ("This link is not valid: it may have expired or been used already. "
                                       "Please start linking again from your app.")),
    "declined": (400, "Linking cancelled", "Linking was cancelled at the provider. Nothing was linked."),
    "refused": (400, "Linking failed", "The provider did not complete the linking. Please start again."),
    "too_wide": (400, "Linking refused", ("The provider granted more access than this service accepts, so "
                                         "nothing was linked. Please start again and grant only what is asked.")),
    "unavailable": (503, "Try again shortly", ("The service cannot complete the linking right now. Please reload "
                                              "this page in a minute.")),
}


def _page(kind: str) -> web.Response:
    status, title, text = _PAGES[kind]
    body = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"</head><body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></body></html>")
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
               "Content-Security-Policy": "default-src 'none'"}
    if status == 503:
        headers["Retry-After"] = "30"
    return web.Response(status=status, text=body, content_type="text/html", headers=headers)


async def oauth2_callback(request: web.Request) -> web.Response:
    if len(request.query_string) > _MAX_QUERY:
        return _page("invalid")
    service = request.app[LINKING_KEY]
    try:
        linked = await service.callback(request.query.items())
    except CallbackRefused as exc:
        log.info("account linking callback refused (%s): %s", exc.page, exc, extra={"source": request.remote})
        return _page(exc.page)
    except LinkingUnavailable as exc:
        log.warning("account linking callback deferred: %s", exc)
        return _page("unavailable")
    log.info("account linked at %s", linked.connector, extra={"scopes": sorted(linked.scopes)})
    return _page("linked")


def callback_routes(app: web.Application, service: LinkingService) -> None:
    """Add ``GET /oauth2/callback`` to ``app`` (IIM's HTTP site), served by ``service``."""
    app[LINKING_KEY] = service
    app.router.add_get(CALLBACK_PATH, oauth2_callback)
