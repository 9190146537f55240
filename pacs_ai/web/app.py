"""The Starlette application: routes, the login/session/CSRF gate, page handlers.

Everything but ``/healthz``, ``/readyz``, ``/static`` and (with ``http.metrics_public``)
``/metrics`` needs a logged-in user; GETs without one are redirected to ``/login``, other
methods get 401. Every POST carries the session's CSRF token (403 otherwise). Viewers get no
PHI: the queries leave those columns out, not just the templates.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import make_url, select
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pacs_ai.db import audit
from pacs_ai.db.events import write_audit
from pacs_ai.db.models import Report, StudyState
from pacs_ai.storage.reports import report_reader
from pacs_ai.storage.uploader import upload_lag_alert
from pacs_ai.web import actions, queries, render
from pacs_ai.web.context import WebContext
from pacs_ai.web.health import readiness
from pacs_ai.web.metrics import make_registry
from pacs_ai.web.session import COOKIE, SessionCodec, SessionData, csrf_ok, load_secret, new_session
from pacs_ai.web.users import ConsoleUser, LoginLimiter, authenticate, lookup

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


# Probes and scrapers get no session cookie.
_MACHINE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class _LoginRequired(Exception):
    pass


class _Console:
    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx
        self.http = ctx.settings.http
        self.codec = SessionCodec(load_secret(self.http), self.http.session_minutes * 60)
        self.limiter = LoginLimiter(self.http.login_max_failures, self.http.login_window_seconds)
        self.registry = make_registry(ctx.settings, ctx.engine)
        self._report_file = report_reader(ctx.settings)
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,  # every DICOM-derived string is escaped
            undefined=jinja2.StrictUndefined,
        )
        self.env.filters["ts"] = _ts
        self.env.filters["bytes"] = _bytes
        self.env.filters["short_uid"] = _short_uid

    # --- plumbing --------------------------------------------------------------------------

    def page(self, request: Request, name: str, status: int = 200, **values: Any) -> Response:
        session: SessionData = request.state.session
        template = self.env.get_template(name)
        html = template.render(
            user=request.state.user,
            csrf=session.csrf,
            path=request.url.path,
            ae_title=self.ctx.settings.dicom.ae_title,
            msg=request.query_params.get("msg"),
            kind="danger" if request.query_params.get("kind") == "danger" else "ok",
            **values,
        )
        return HTMLResponse(html, status_code=status)

    async def user(self, request: Request, admin: bool = False) -> ConsoleUser:
        user: ConsoleUser | None = request.state.user
        if user is None:
            raise _LoginRequired
        if admin and not user.is_admin:
            raise HTTPException(403, "admins only")
        return user

    async def form(self, request: Request) -> FormData:
        """The POSTed form, after its CSRF token was checked."""
        form = await request.form()
        token = form.get("csrf")
        if not csrf_ok(request.state.session, token if isinstance(token, str) else None):
            raise HTTPException(403, "missing or wrong CSRF token")
        return form

    def audit(
        self,
        actor: str,
        action: str,
        outcome: str,
        kind: str | None = None,
        object_id: int | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        with self.ctx.engine.begin() as conn:
            write_audit(conn, actor, action, outcome, kind, object_id, detail)

    # --- public ----------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(self, request: Request) -> Response:
        checks = await run_in_threadpool(readiness, self.ctx)
        ok = all(c.ok for c in checks)
        return JSONResponse(
            {
                "status": "ready" if ok else "not ready",
                "checks": {c.name: c.as_dict() for c in checks},
            },
            status_code=200 if ok else 503,
        )

    async def metrics(self, request: Request) -> Response:
        if not self.http.metrics_public and request.state.user is None:
            user = await run_in_threadpool(self._basic_auth, request)
            if user is None:
                return PlainTextResponse(
                    "login required", 401, headers={"WWW-Authenticate": 'Basic realm="pacs-ai"'}
                )
        body = await run_in_threadpool(generate_latest, self.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    def _basic_auth(self, request: Request) -> ConsoleUser | None:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("basic "):
            return None
        try:
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        address = request.client.host if request.client else "?"
        if self.limiter.blocked(name, address):
            return None
        user = authenticate(self.ctx.engine, name, password)
        if user is None:
            self.limiter.failed(name, address)
        return user

    async def login(self, request: Request) -> Response:
        nxt = _safe_next(request.query_params.get("next"))
        if request.method == "GET":
            return self.page(request, "login.html", next=nxt, error=None)
        form = await self.form(request)
        name = str(form.get("username", ""))[:64]
        password = str(form.get("password", ""))
        nxt = _safe_next(str(form.get("next", "/")))
        address = request.client.host if request.client else "?"
        if self.limiter.blocked(name, address):
            await run_in_threadpool(
                self.audit,
                f"web:{name}",
                "login",
                "refused",
                None,
                None,
                {"reason": "rate limited", "address": address},
            )
            return self.page(
                request,
                "login.html",
                status=429,
                next=nxt,
                error="Too many failed attempts. Try again later.",
            )
        user = await run_in_threadpool(authenticate, self.ctx.engine, name, password)
        if user is None:
            self.limiter.failed(name, address)
            await run_in_threadpool(
                self.audit, f"web:{name}", "login", "error", None, None, {"address": address}
            )
            return self.page(
                request, "login.html", status=401, next=nxt, error="Wrong user name or password."
            )
        self.limiter.succeeded(name, address)
        await run_in_threadpool(
            self.audit, user.actor, "login", "ok", None, None, {"address": address}
        )
        request.state.session = new_session(user.name)  # a fresh token at login
        return RedirectResponse(nxt, 303)

    async def logout(self, request: Request) -> Response:
        await self.form(request)
        user = request.state.user
        if user is not None:
            await run_in_threadpool(self.audit, user.actor, "logout", "ok")
        request.state.session = new_session()
        return RedirectResponse("/login", 303)

    # --- pages -----------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        await self.user(request)
        data = await run_in_threadpool(queries.overview, self.ctx.engine)
        checks = await run_in_threadpool(readiness, self.ctx)
        alerts = []
        dead = data["deliveries_by_state"]["dead"]
        if dead:
            alerts.append(
                ("danger", f"{dead} dead deliveries need an admin", "/deliveries?state=dead")
            )
        failed = data["studies_by_state"]["failed"]
        if failed:
            alerts.append(
                ("danger", f"{failed} studies failed in the pipeline", "/studies?state=failed")
            )
        for c in checks:
            if not c.ok:
                alerts.append(("danger", f"{c.name}: {c.detail}", "/readyz"))
        lag = await run_in_threadpool(upload_lag_alert, self.ctx.settings, self.ctx.engine)
        if lag:
            alerts.append(("danger", lag, "/metrics"))
        for a in data["model_alerts"]:
            alerts.append(
                ("danger", f"model {a['model']} ({a['label']}): {a['detail']}", "/models")
            )
        chart = json.dumps(data["chart"])
        return self.page(
            request, "overview.html", d=data, checks=checks, alerts=alerts, chart_json=chart
        )

    async def studies(self, request: Request) -> Response:
        user = await self.user(request)
        q = request.query_params
        f = queries.StudyFilter(
            state=q.get("state") or None,
            modality=q.get("modality") or None,
            date_from=_date(q.get("from")),
            date_to=_date(q.get("to")),
            calling_ae=q.get("ae") or None,
            finding=q.get("finding") or None,
            uid=q.get("uid") or None,
            accession=(q.get("accession") or None) if user.is_admin else None,
            before_id=_int(q.get("before")),
        )
        page = await run_in_threadpool(queries.studies, self.ctx.engine, f, user.is_admin)
        labels = self._finding_labels()
        params = {k: v for k, v in q.items() if k != "before" and v}
        if not user.is_admin:
            params.pop("accession", None)
        next_url = None
        if page.next_before_id:
            next_url = "/studies?" + "&".join(
                f"{quote(k)}={quote(v)}"
                for k, v in {**params, "before": str(page.next_before_id)}.items()
            )
        return self.page(
            request,
            "studies.html",
            page=page,
            f=f,
            params=params,
            states=[s.value for s in StudyState],
            labels=labels,
            next_url=next_url,
        )

    async def study(self, request: Request) -> Response:
        user = await self.user(request)
        study_id = int(request.path_params["study_id"])
        data = await run_in_threadpool(
            queries.study_detail, self.ctx.engine, study_id, user.is_admin
        )
        if data is None:
            raise HTTPException(404, "no such study")
        trees = []
        for r in data["reports"]:
            if r["kind"] == "sr" and r["study_revision"] == data["study"]["revision"]:
                path = self._report_path(r["path"])
                if path is not None:
                    trees = await run_in_threadpool(render.sr_tree, path)
        summary = [r for r in data["reports"] if r["kind"] == "summary"]
        series_by_id = {s["id"]: s for s in data["series"]}
        return self.page(
            request,
            "study.html",
            d=data,
            trees=trees,
            summary=summary[-1] if summary else None,
            series_by_id=series_by_id,
        )

    def _report_path(self, rel: str) -> Path | None:
        try:  # the file here, or (storage.backend = "s3") from the bucket
            path = self._report_file(rel)
        except ValueError:  # outside reports.path
            return None
        return path if path.is_file() else None

    async def _report(self, request: Request) -> tuple[int, Path]:
        study_id = int(request.path_params["study_id"])
        report_id = int(request.path_params["report_id"])
        with self.ctx.engine.connect() as conn:
            row = conn.execute(
                select(Report.path, Report.kind).where(
                    Report.id == report_id, Report.study_id == study_id
                )
            ).first()
        path = await run_in_threadpool(self._report_path, row.path) if row else None
        if path is None:
            raise HTTPException(404, "no such report object")
        return report_id, path

    async def report_png(self, request: Request) -> Response:
        await self.user(request)
        _rid, path = await self._report(request)
        png = await run_in_threadpool(render.summary_png, path)
        return Response(
            png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
        )

    async def report_download(self, request: Request) -> Response:
        user = await self.user(request, admin=True)
        rid, path = await self._report(request)
        await run_in_threadpool(self.audit, user.actor, "report_downloaded", "ok", "report", rid)
        return Response(
            path.read_bytes(),
            media_type="application/dicom",
            headers={"Content-Disposition": f'attachment; filename="report-{rid}.dcm"'},
        )

    async def rerun(self, request: Request) -> Response:
        user = await self.user(request, admin=True)
        await self.form(request)
        study_id = int(request.path_params["study_id"])
        try:
            rev = await run_in_threadpool(
                actions.rerun_study, self.ctx.engine, study_id, user.actor
            )
        except actions.ActionRefused as exc:
            return self._back(f"/studies/{study_id}", str(exc), "danger")
        if self.ctx.wake_pipeline:
            self.ctx.wake_pipeline()
        return self._back(f"/studies/{study_id}", f"Re-run queued as revision {rev}.")

    async def redeliver(self, request: Request) -> Response:
        user = await self.user(request, admin=True)
        await self.form(request)
        study_id = int(request.path_params["study_id"])
        try:
            n = await run_in_threadpool(
                actions.redeliver_study, self.ctx.engine, self.ctx.settings, study_id, user.actor
            )
        except actions.ActionRefused as exc:
            return self._back(f"/studies/{study_id}", str(exc), "danger")
        self._wake_outbox()
        return self._back(f"/studies/{study_id}", f"{n} deliveries queued.")

    async def retry_delivery(self, request: Request) -> Response:
        user = await self.user(request, admin=True)
        form = await self.form(request)
        delivery_id = int(request.path_params["delivery_id"])
        n = await run_in_threadpool(
            actions.retry_deliveries, self.ctx.engine, self.ctx.settings, [delivery_id], user.actor
        )
        self._wake_outbox()
        back = _safe_next(str(form.get("back", "/deliveries")))
        if n:
            return self._back(back, f"Delivery {delivery_id} re-queued.")
        return self._back(back, f"Delivery {delivery_id} is not dead or failed.", "danger")

    async def retry_dead(self, request: Request) -> Response:
        user = await self.user(request, admin=True)
        await self.form(request)
        n = await run_in_threadpool(
            actions.retry_deliveries, self.ctx.engine, self.ctx.settings, None, user.actor
        )
        self._wake_outbox()
        return self._back("/deliveries", f"{n} dead deliveries re-queued.")

    def _wake_outbox(self) -> None:
        if self.ctx.wake_outbox:
            self.ctx.wake_outbox()

    def _back(self, url: str, message: str, kind: str = "ok") -> Response:
        sep = "&" if "?" in url else "?"
        return RedirectResponse(f"{url}{sep}msg={quote(message)}&kind={kind}", 303)

    async def deliveries(self, request: Request) -> Response:
        await self.user(request)
        state = request.query_params.get("state") or None
        rows = await run_in_threadpool(audit.deliveries, self.ctx.engine, state, None, 200)
        return self.page(
            request,
            "deliveries.html",
            rows=rows,
            state=state,
            states=["pending", "sending", "delivered", "failed", "dead"],
        )

    async def associations(self, request: Request) -> Response:
        await self.user(request)
        ae = request.query_params.get("ae") or None
        rows = await run_in_threadpool(audit.associations, self.ctx.engine, None, ae, 200)
        return self.page(request, "associations.html", rows=rows, ae=ae)

    async def events(self, request: Request) -> Response:
        await self.user(request)
        action = request.query_params.get("action") or None
        rows = await run_in_threadpool(audit.events, self.ctx.engine, None, action, None, 200)
        return self.page(request, "events.html", rows=rows, action=action)

    async def models(self, request: Request) -> Response:
        await self.user(request)
        cards = [(key, _load_card(d)) for key, d in self._model_dirs().items()]
        return self.page(request, "models.html", cards=cards)

    def _finding_labels(self) -> list[str]:
        """Finding labels of the configured models (for the studies filter)."""
        labels: set[str] = set()
        for directory in self._model_dirs().values():
            for f in _load_card(directory).get("findings", []):
                if isinstance(f, dict) and isinstance(f.get("label"), str):
                    labels.add(f["label"])
        return sorted(labels)

    def _model_dirs(self) -> dict[str, Path]:
        inf = self.ctx.settings.inference
        out = {}
        for key, source in (("cxr", inf.cxr_model), ("ct", inf.ct_model)):
            if source.startswith("bundled:"):
                out[key] = HERE.parent / "models" / f"{source.removeprefix('bundled:')}-demo"
            else:
                out[key] = Path(source)
        return out

    async def model_plot(self, request: Request) -> Response:
        await self.user(request)
        key, plot = request.path_params["key"], request.path_params["plot"]
        directory = self._model_dirs().get(key)
        if directory is None or plot not in ("roc", "confusion"):
            raise HTTPException(404)
        path = directory / f"{plot}.png"
        if not path.is_file():
            raise HTTPException(404)
        return Response(path.read_bytes(), media_type="image/png")

    async def config(self, request: Request) -> Response:
        await self.user(request)
        return self.page(
            request, "config.html", config_json=json.dumps(effective_config(self.ctx), indent=2)
        )


def effective_config(ctx: WebContext) -> dict[str, Any]:
    """The running settings without secrets (database password hidden)."""
    data = ctx.settings.model_dump(mode="json", exclude={"source"})
    data["database"]["url"] = make_url(ctx.settings.database.url).render_as_string(
        hide_password=True
    )
    return data


def _load_card(directory: Path) -> dict[str, Any]:
    try:
        card: dict[str, Any] = json.loads((directory / "card.json").read_text())
    except (OSError, ValueError) as exc:
        return {"error": f"cannot read the model card: {exc.__class__.__name__}"}
    card["has_roc"] = (directory / "roc.png").is_file()
    card["has_confusion"] = (directory / "confusion.png").is_file()
    return card


def _safe_next(value: str | None) -> str:
    """Only a local path (no scheme, no host, no //) may be a redirect target."""
    if not value:
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or not value.startswith("/") or value.startswith("//"):
        return "/"
    return value


def _date(value: str | None) -> dt.date | None:
    try:
        return dt.date.fromisoformat(value) if value else None
    except ValueError:
        return None


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


def _ts(value: Any) -> str:
    if not value:
        return ""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    return str(value).replace("T", " ")[:19]


def _bytes(value: Any) -> str:
    n = float(value or 0)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(value)


def _short_uid(value: Any) -> str:
    text = str(value or "")
    return text if len(text) <= 28 else f"{text[:12]}…{text[-12:]}"


class _SessionMiddleware(BaseHTTPMiddleware):
    def __init__(self, app: Any, console: _Console) -> None:
        super().__init__(app)
        self.console = console

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        console = self.console
        raw = request.cookies.get(COOKIE)
        session = console.codec.loads(raw)
        fresh = session is None
        request.state.session = session or new_session()
        request.state.user = None
        if session is not None and session.user:
            request.state.user = await run_in_threadpool(lookup, console.ctx.engine, session.user)
        response = await call_next(request)
        new = request.state.session
        machine = fresh and request.url.path in _MACHINE_PATHS
        if not machine and (fresh or new is not session or session.user is not None):
            # re-signed on each request: the expiry slides with activity
            response.set_cookie(
                COOKIE,
                console.codec.dumps(new),
                max_age=console.codec.max_age,
                httponly=True,
                samesite="strict",
                secure=console.http.tls,
                path="/",
            )
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if not request.url.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response


def build_app(ctx: WebContext) -> Starlette:
    c = _Console(ctx)

    async def login_required(request: Request, exc: Exception) -> Response:
        if request.method in ("GET", "HEAD"):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target)}", 302)
        return PlainTextResponse("login required", 401)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if request.state.session is None:  # pragma: no cover - middleware always sets it
            return PlainTextResponse(exc.detail, exc.status_code)
        return c.page(
            request,
            "error.html",
            status=exc.status_code,
            status_code=exc.status_code,
            detail=exc.detail,
        )

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        _LoginRequired: login_required,
        HTTPException: http_error,
    }
    routes = [
        Route("/healthz", c.healthz),
        Route("/readyz", c.readyz),
        Route("/metrics", c.metrics),
        Route("/login", c.login, methods=["GET", "POST"]),
        Route("/logout", c.logout, methods=["POST"]),
        Route("/", c.overview),
        Route("/studies", c.studies),
        Route("/studies/{study_id:int}", c.study),
        Route("/studies/{study_id:int}/reports/{report_id:int}/image.png", c.report_png),
        Route("/studies/{study_id:int}/reports/{report_id:int}/download", c.report_download),
        Route("/studies/{study_id:int}/rerun", c.rerun, methods=["POST"]),
        Route("/studies/{study_id:int}/redeliver", c.redeliver, methods=["POST"]),
        Route("/deliveries", c.deliveries),
        Route("/deliveries/{delivery_id:int}/retry", c.retry_delivery, methods=["POST"]),
        Route("/deliveries/retry-dead", c.retry_dead, methods=["POST"]),
        Route("/associations", c.associations),
        Route("/events", c.events),
        Route("/models", c.models),
        Route("/models/{key}/{plot}.png", c.model_plot),
        Route("/config", c.config),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(_SessionMiddleware, console=c)],
        exception_handlers=handlers,
    )
