"""The web app's routers, one per area: `auth` (sign-in), `pages` (clinicians' pages), `admin`
(dashboard, audit log, users), `api` (health, schema, REST API). `lungcad.web.app` includes them."""

from lungcad.web.routes import admin, api, auth, pages

__all__ = ["admin", "api", "auth", "pages"]
