"""The console over HTTP (Starlette's test client): login gate, roles and PHI, CSRF, rate
limiting, escaping, actions with their audit events, /healthz, /readyz and /metrics against
the database. The browser and the real service are in tests/integration/test_console.py."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, func, select
from starlette.testclient import TestClient

from pacs_ai.db.models import (
    AuditEvent,
    Delivery,
    DeliveryState,
    Finding,
    Study,
    StudyState,
    User,
    UserRole,
)
from pacs_ai.db.session import make_engine
from pacs_ai.errors import ConfigError
from pacs_ai.web import WebContext, build_app
from pacs_ai.web.users import add_user
from tests.conftest import make_settings, prepared_database
from tests.integration.process import write_config
from tests.webdata import ACCESSION, HOSTILE_NAME, PATIENT_ID, Seeded, seed_study

ADMIN_PW = "correct horse battery"
VIEWER_PW = "viewer password 1"


@dataclass
class Console:
    app: object
    engine: Engine
    seeded: Seeded

    def client(self) -> TestClient:
        return TestClient(self.app, follow_redirects=False)  # type: ignore[arg-type]


def _console(tmp_path: Path, **http: object) -> Iterator[Console]:
    settings = make_settings(
        tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", http={"enabled": True, **http}
    )
    prepared_database(settings)
    engine = make_engine(settings.database)
    add_user(engine, "alice", UserRole.ADMIN, ADMIN_PW)
    add_user(engine, "victor", UserRole.VIEWER, VIEWER_PW)
    seeded = seed_study(engine)
    ctx = WebContext(settings, engine, listener_accepting=lambda: True, models_loaded=lambda: True)
    yield Console(build_app(ctx), engine, seeded)
    engine.dispose()


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    yield from _console(tmp_path)


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "no CSRF field on the page"
    return m.group(1)


def login(client: TestClient, name: str, password: str) -> int:
    page = client.get("/login")
    r = client.post(
        "/login",
        data={"username": name, "password": password, "csrf": csrf_of(page.text), "next": "/"},
    )
    return r.status_code


def test_anonymous_requests_are_refused(console: Console) -> None:
    c = console.client()
    for path in ("/", "/studies", f"/studies/{console.seeded.study_id}", "/deliveries", "/config"):
        r = c.get(path)
        assert r.status_code == 302
        assert r.headers["location"].startswith("/login?next=")
    r = c.post(f"/deliveries/{console.seeded.delivery_id}/retry", data={"csrf": "x"})
    assert r.status_code == 401
    assert c.get("/healthz").json() == {"status": "alive"}


def test_readyz_reports_each_check(console: Console) -> None:
    r = console.client().get("/readyz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ready"
    assert set(body["checks"]) == {"database", "spool", "models", "listener"}
    assert all(c["ok"] for c in body["checks"].values())


def test_readyz_503_when_the_listener_is_down(tmp_path: Path) -> None:
    gen = _console(tmp_path)
    con = next(gen)
    ctx = WebContext(
        make_settings(tmp_path, str(con.engine.url), http={"enabled": True}),
        con.engine,
        listener_accepting=lambda: False,
        models_loaded=lambda: False,
    )
    r = TestClient(build_app(ctx)).get("/readyz")
    assert r.status_code == 503
    checks = r.json()["checks"]
    assert checks["listener"] == {"ok": False, "detail": "not accepting"}
    assert checks["models"] == {"ok": False, "detail": "not loaded yet"}
    assert checks["database"]["ok"] is True
    gen.close()


def test_login_cookie_flags_and_wrong_password(console: Console) -> None:
    c = console.client()
    assert login(c, "alice", "wrong password") == 401
    page = c.get("/login")
    r = c.post(
        "/login",
        data={"username": "alice", "password": ADMIN_PW, "csrf": csrf_of(page.text), "next": "/"},
    )
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
    assert c.get("/").status_code == 200
    with console.engine.connect() as conn:
        actors = conn.execute(
            select(AuditEvent.actor, AuditEvent.outcome).where(AuditEvent.action == "login")
        ).all()
    assert actors == [("web:alice", "error"), ("admin:alice", "ok")]


def test_login_is_rate_limited_per_user_and_address(console: Console) -> None:
    c = console.client()
    for _ in range(5):
        assert login(c, "alice", "nope nope") == 401
    # the right password no longer helps within the window
    assert login(c, "alice", ADMIN_PW) == 429
    # another user from the same address is not affected
    assert login(c, "victor", VIEWER_PW) == 303


def test_post_without_csrf_token_is_403(console: Console) -> None:
    c = console.client()
    assert login(c, "alice", ADMIN_PW) == 303
    s = console.seeded
    for path in (
        f"/deliveries/{s.delivery_id}/retry",
        "/deliveries/retry-dead",
        f"/studies/{s.study_id}/rerun",
        f"/studies/{s.study_id}/redeliver",
        "/logout",
    ):
        assert c.post(path).status_code == 403, path
        assert c.post(path, data={"csrf": "forged"}).status_code == 403, path
    with console.engine.connect() as conn:
        assert conn.scalar(select(Delivery.state)) == DeliveryState.DEAD
        assert conn.scalar(select(Study.revision)) == 0
    # the login form is protected too
    fresh = console.client()
    r = fresh.post("/login", data={"username": "alice", "password": ADMIN_PW})
    assert r.status_code == 403


def test_admin_sees_phi_escaped_viewer_sees_none(console: Console) -> None:
    admin, viewer = console.client(), console.client()
    assert login(admin, "alice", ADMIN_PW) == 303
    assert login(viewer, "victor", VIEWER_PW) == 303
    sid = console.seeded.study_id
    for path in ("/studies", f"/studies/{sid}"):
        html = admin.get(path).text
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;^Evil" in html
        assert HOSTILE_NAME not in html  # never raw
        assert PATIENT_ID in html and ACCESSION in html
        vhtml = viewer.get(path).text
        assert console.seeded.study_uid in vhtml
        for phi in ("alert(", "Evil", PATIENT_ID, ACCESSION):
            assert phi not in vhtml, (path, phi)
    # search by accession: admins only
    assert console.seeded.study_uid in admin.get(f"/studies?accession={ACCESSION}").text
    assert 'name="accession"' not in viewer.get("/studies").text
    # the viewer's accession parameter is ignored, not used to probe for a match
    probe = viewer.get("/studies?accession=NO-SUCH").text
    assert console.seeded.study_uid in probe
    # viewers run no actions and download nothing
    html = viewer.get(f"/studies/{sid}").text
    assert 'id="rerun"' not in html
    r = viewer.post(f"/studies/{sid}/rerun", data={"csrf": csrf_of(html)})
    assert r.status_code == 403


def test_retry_rerun_redeliver_are_audited_with_the_user(console: Console) -> None:
    c = console.client()
    assert login(c, "alice", ADMIN_PW) == 303
    s = console.seeded
    token = csrf_of(c.get(f"/studies/{s.study_id}").text)
    r = c.post(f"/deliveries/{s.delivery_id}/retry", data={"csrf": token})
    assert r.status_code == 303
    assert "re-queued" in c.get(r.headers["location"]).text
    r = c.post(f"/studies/{s.study_id}/rerun", data={"csrf": token})
    assert r.status_code == 303
    with console.engine.connect() as conn:
        assert conn.scalar(select(Delivery.state)) == DeliveryState.PENDING
        study = conn.execute(select(Study.state, Study.revision)).one()
        assert tuple(study) == (StudyState.READY, 1)
        events = conn.execute(
            select(AuditEvent.actor, AuditEvent.action, AuditEvent.object_id)
            .where(AuditEvent.actor.like("admin:%"), AuditEvent.action != "login")
            .order_by(AuditEvent.id)
        ).all()
    assert events == [
        ("admin:alice", "delivery_requeued", s.delivery_id),
        ("admin:alice", "study_rerun", s.study_id),
    ]
    # a second re-run while the study waits for the pipeline is refused, and audited
    r = c.post(f"/studies/{s.study_id}/rerun", data={"csrf": token})
    assert "kind=danger" in r.headers["location"]
    with console.engine.connect() as conn:
        assert conn.scalar(select(Study.revision)) == 1


def test_pages_render_for_admin(console: Console) -> None:
    c = console.client()
    assert login(c, "alice", ADMIN_PW) == 303
    for path in ("/", "/studies", "/deliveries", "/associations", "/events", "/models", "/config"):
        r = c.get(path)
        assert r.status_code == 200, path
        assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "cxr-demo" in c.get("/models").text
    assert c.get("/models/cxr/roc.png").headers["content-type"] == "image/png"
    assert c.get("/static/vendor/uplot/uPlot.iife.min.js").status_code == 200


def test_config_page_hides_the_database_password(tmp_path: Path) -> None:
    url = "postgresql+psycopg://pacs:s3cret-pw@127.0.0.1/pacs"
    settings = make_settings(tmp_path, url, http={"enabled": True})
    from pacs_ai.web.app import effective_config

    sqlite = make_engine(make_settings(tmp_path, "sqlite://").database)
    text = str(effective_config(WebContext(settings, sqlite)))
    assert "s3cret-pw" not in text and "pacs:***@127.0.0.1" in text


def _metrics(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    out = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_match_the_database(console: Console) -> None:
    c = console.client()
    seed_study(
        console.engine,
        n=2,
        state=StudyState.DELIVERED,
        present=False,
        delivery_state=DeliveryState.DELIVERED,
    )
    m = _metrics(c)
    assert m[("pacs_ai_studies", (("state", "reported"),))] == 1
    assert m[("pacs_ai_studies", (("state", "delivered"),))] == 1
    assert m[("pacs_ai_studies", (("state", "ready"),))] == 0
    assert m[("pacs_ai_instances_received_total", (("outcome", "stored"),))] == 2
    assert m[("pacs_ai_received_bytes_total", ())] == 1001 + 1002
    assert m[("pacs_ai_associations_total", (("reason", "released"), ("result", "accepted")))] == 2
    assert m[("pacs_ai_deliveries", (("state", "dead"),))] == 1
    assert m[("pacs_ai_deliveries", (("state", "delivered"),))] == 1
    assert m[("pacs_ai_delivery_oldest_undelivered_age_seconds", ())] >= 180
    with console.engine.connect() as conn:
        present = conn.scalar(
            select(func.count()).select_from(Finding).where(Finding.present.is_(True))
        )
    key = (("decision", "present"), ("finding", "covid"), ("model", "cxr-demo"))
    assert m[("pacs_ai_findings_total", key)] == present == 1
    job = (("model", "cxr-demo 1.0"), ("state", "succeeded"))
    assert m[("pacs_ai_job_duration_seconds_count", job)] == 2
    assert m[("pacs_ai_job_duration_seconds_sum", job)] == 3.0
    assert m[("pacs_ai_job_duration_seconds_bucket", (("le", "1.0"), *job))] == 0
    assert m[("pacs_ai_job_duration_seconds_bucket", (("le", "2.5"), *job))] == 2
    assert m[("pacs_ai_spool_free_bytes", ())] > 0
    # incremental tallies: a third study is counted once, on the next scrape
    seed_study(console.engine, n=3)
    m2 = _metrics(c)
    assert m2[("pacs_ai_instances_received_total", (("outcome", "stored"),))] == 3
    assert m2[("pacs_ai_findings_total", key)] == 2
    assert m2[("pacs_ai_job_duration_seconds_count", job)] == 3


def test_private_metrics_need_a_user(tmp_path: Path) -> None:
    gen = _console(tmp_path, metrics_public=False)
    con = next(gen)
    c = con.client()
    r = c.get("/metrics")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert c.get("/metrics", auth=("alice", "wrong")).status_code == 401
    r = c.get("/metrics", auth=("victor", VIEWER_PW))
    assert r.status_code == 200 and "pacs_ai_studies" in r.text
    gen.close()


def test_user_cli_reads_the_password_from_stdin(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    prepared_database(settings)
    cfg = write_config(settings, tmp_path / "config.toml")

    def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pacs_ai", "user", *args, "--config", str(cfg)],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    r = cli("add", "bob", "--role", "viewer", stdin="a long password\n")
    assert r.returncode == 0, r.stderr
    engine = make_engine(settings.database)
    with pytest.raises(ConfigError, match="exists already"):
        add_user(engine, "bob", UserRole.ADMIN, "another password")
    with pytest.raises(ConfigError, match="at least 8"):
        add_user(engine, "carl", UserRole.ADMIN, "short")
    listed = cli("list", "--format", "json")
    assert '"name": "bob"' in listed.stdout and '"role": "viewer"' in listed.stdout
    with engine.connect() as conn:
        stored = conn.scalar(select(User.password_hash).where(User.name == "bob"))
    assert stored is not None and stored.startswith("$argon2id$")
    assert cli("remove", "bob").returncode == 0
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(User)) == 0
    engine.dispose()


def test_probes_get_no_cookie(console: Console) -> None:
    c = console.client()
    for path in ("/healthz", "/readyz", "/metrics"):
        assert "set-cookie" not in c.get(path).headers, path
    assert "set-cookie" in c.get("/login").headers


def test_login_redirects_only_to_local_paths(console: Console) -> None:
    c = console.client()
    for target, expected in (
        ("//evil.example/x", "/"),
        ("https://evil.example/", "/"),
        ("/studies?state=failed", "/studies?state=failed"),
    ):
        page = c.get("/login")
        r = c.post(
            "/login",
            data={
                "username": "alice",
                "password": ADMIN_PW,
                "csrf": csrf_of(page.text),
                "next": target,
            },
        )
        assert r.status_code == 303 and r.headers["location"] == expected


def test_removing_a_user_ends_their_session(console: Console) -> None:
    from pacs_ai.web.users import remove_user

    c = console.client()
    assert login(c, "victor", VIEWER_PW) == 303
    assert c.get("/studies").status_code == 200
    assert remove_user(console.engine, "victor")
    assert c.get("/studies").status_code == 302


def test_redeliver_queues_delivered_reports_again(tmp_path: Path) -> None:
    from pacs_ai.web import actions

    settings = make_settings(
        tmp_path,
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
    )
    prepared_database(settings)
    engine = make_engine(settings.database)
    s = seed_study(engine, state=StudyState.DELIVERED, delivery_state=DeliveryState.DELIVERED)
    assert actions.redeliver_study(engine, settings, s.study_id, "admin:alice") == 1
    with engine.connect() as conn:
        row = conn.execute(select(Delivery.state, Delivery.attempts, Delivery.delivered_at)).one()
        actions_logged = conn.scalars(
            select(AuditEvent.action)
            .where(AuditEvent.actor == "admin:alice")
            .order_by(AuditEvent.id)
        ).all()
    engine.dispose()
    assert tuple(row) == (DeliveryState.PENDING, 0, None)
    assert actions_logged == ["study_redelivered"]


def test_open_associations_are_counted_once_they_settle(console: Console) -> None:
    from sqlalchemy import insert, update

    from pacs_ai.db.models import Association

    c = console.client()
    stored = ("pacs_ai_instances_received_total", (("outcome", "stored"),))
    assert _metrics(c)[stored] == 1
    with console.engine.begin() as conn:
        open_id = conn.execute(
            insert(Association)
            .values(
                calling_ae="CT1",
                called_ae="PACS_AI",
                peer_host="127.0.0.1",
                peer_port=1,
                accepted=True,
                instances_stored=2,
            )
            .returning(Association.id)
        ).scalar_one()
    seed_study(console.engine, n=2)  # a later association that has ended
    m = _metrics(c)
    assert m[stored] == 1 + 2 + 1
    assert m[("pacs_ai_associations_open", ())] == 1
    assert m[("pacs_ai_associations_total", (("reason", "released"), ("result", "accepted")))] == 2
    with console.engine.begin() as conn:
        conn.execute(
            update(Association)
            .where(Association.id == open_id)
            .values(instances_stored=5, ended_at=func.now(), end_reason="released")
        )
    m = _metrics(c)
    assert m[stored] == 1 + 5 + 1
    assert m[("pacs_ai_associations_open", ())] == 0
    assert m[("pacs_ai_associations_total", (("reason", "released"), ("result", "accepted")))] == 3
    assert _metrics(c)[stored] == 7  # and stays so


def test_logout_ends_the_session(console: Console) -> None:
    c = console.client()
    assert login(c, "alice", ADMIN_PW) == 303
    token = csrf_of(c.get("/").text)
    r = c.post("/logout", data={"csrf": token})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert c.get("/").status_code == 302


def test_metrics_and_overview_show_retention_purges_and_model_alerts(console: Console) -> None:
    from sqlalchemy import insert

    from pacs_ai.db.events import write_audit
    from pacs_ai.db.models import ModelAlert

    c = console.client()
    with console.engine.begin() as conn:
        for n, size in ((3, 3000), (2, 1500)):
            write_audit(
                conn, "system", "objects_purged", "ok", "study", 1, {"instances": n, "bytes": size}
            )
        write_audit(
            conn, "system", "reports_purged", "ok", "study", 1, {"reports": 2, "bytes": 700}
        )
        conn.execute(
            insert(ModelAlert).values(
                model_name="pacs-ai-cxr-demo",
                model_version="1.0",
                label="covid",
                kind="collapse",
                detail="every decision Present in the last 50 series",
                cleared_at=None,
            )
        )
    m = _metrics(c)
    assert m[("pacs_ai_retention_purged_total", (("what", "instances"),))] == 5
    assert m[("pacs_ai_retention_purged_bytes_total", (("what", "instances"),))] == 4500
    assert m[("pacs_ai_retention_purged_total", (("what", "reports"),))] == 2
    assert m[("pacs_ai_retention_purged_bytes_total", (("what", "reports"),))] == 700
    key = (
        "pacs_ai_model_alerts_open",
        (("kind", "collapse"), ("label", "covid"), ("model", "pacs-ai-cxr-demo")),
    )
    assert m[key] == 1
    assert login(c, "alice", ADMIN_PW) == 303
    page = c.get("/").text
    assert "model pacs-ai-cxr-demo (covid): every decision Present in the last 50 series" in page
