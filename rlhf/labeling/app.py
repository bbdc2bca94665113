"""The labeling web app: server-rendered pages for annotators and admins.

`create_app(database_url, ...)` migrates the database to the latest schema and returns the
FastAPI app. Annotators reach only: login, invite, their campaign list, their current item and
the vote on it. Admins also reach /admin (progress, agreement, gold accuracy, invites, export).

Rules every route keeps:
- a page or response an annotator can fetch never carries a gold answer or says which pair is gold;
- an annotator reads and votes only on their own queue (another's item is a 404, as if absent);
- every POST carries a CSRF token: the session's, or before login the double-submit cookie's;
- each vote is committed before the redirect that shows the next pair;
- pages that only read (the session lookup, home, admin figures, the export) use read-only transactions,
  which on SQLite never take the write lock, so votes never wait behind them;
- password tries are throttled per account and per address (`throttle`), request bodies are capped at
  MAX_BODY_BYTES, and cookies are Secure unless the app is reached as localhost (`cookie_is_secure`).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path as FilePath

from fastapi import Depends, FastAPI, Form, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException

from rlhf.comparisons import write_comparisons
from rlhf.labeling import accounts, campaigns, results, throttle
from rlhf.labeling.aggregate import QualityPolicy
from rlhf.labeling.db import Annotator, Assignment, Campaign, make_engine, reader, upgrade_database

HERE = FilePath(__file__).parent
SESSION_COOKIE = "labeling_session"
LOGIN_CSRF_COOKIE = "labeling_login_csrf"  # double-submit token for the forms shown before a session exists
SECURITY_HEADERS = {
    # no inline script or style: the keyboard shortcuts live in /static/label.js
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # invite tokens are in URLs; they must not leak to other sites
}
CSRF_REJECTED = (
    "This form's security token is missing or stale, so the request was refused: it may not have come from "
    "this site. Reload the page and submit again."
)
# Every form here is small: a vote's reason is cut at 2,000 characters (at most ~18 KB URL-encoded).
MAX_BODY_BYTES = 64 * 1024
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
MAX_ID = 2**63 - 1  # SQLite and PostgreSQL integer keys are 64-bit; a larger id cannot name anything


def cookie_is_secure(scheme: str, host: str | None, forced: bool | None) -> bool:
    """Whether cookies get the Secure attribute: as forced, else always unless reached as localhost over HTTP.

    A browser on localhost talks to this machine only, so its cookies cannot be read on the way; anywhere else
    a session cookie sent over plain HTTP could be copied by anyone on the path.
    """
    if forced is not None:
        return forced
    return scheme == "https" or host not in LOCAL_HOSTS


def body_too_large_message(size: int | None) -> str:
    size_is = f"is {size:,} bytes, " if size is not None else "is "
    return (
        f"The request body {size_is}over this app's limit of {MAX_BODY_BYTES:,} bytes per request, so it was "
        "refused unread. The forms here are small (a reason is cut at 2,000 characters anyway): shorten what you "
        "typed and submit again."
    )


class BodyLimit:
    """ASGI middleware: a request whose body exceeds `max_bytes` is answered by `refuse(scope, size)` unread.

    A declared Content-Length over the limit is refused at once; a body without one (chunked) is read up to
    the limit and refused as soon as it passes it. Bodies within the limit are buffered and replayed.
    """

    def __init__(self, app, max_bytes: int, refuse):
        self.app, self.max_bytes, self.refuse = app, max_bytes, refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self.refuse(scope, int(declared))(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                return await self.app(scope, _replay(message, receive), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self.refuse(scope, None)(scope, receive, send)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay(body, receive), send)


def _replay(first: dict, receive):
    """A `receive` that hands out `first`, then falls back to the real one (which waits for the disconnect)."""
    pending = [first]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


class LoginRequired(Exception):
    """No live session: the handler sends the browser to the login page."""


@dataclass(frozen=True)
class Viewer:
    """The logged-in person making the request."""

    annotator_id: int
    name: str
    role: str
    csrf_token: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def create_app(database_url: str, *, session_hours: float = 12.0, gold_accuracy_threshold: float = 0.7,
               gold_min_answers: int = 3, flagged_vote_weight: float = 0.0,
               secure_cookies: bool | None = None) -> FastAPI:
    """The app on this database (SQLite file or PostgreSQL URL), migrated to the latest schema.

    session_hours: a login lasts this long. The three quality settings decide who is flagged on gold
    and what their votes weigh (see `aggregate.QualityPolicy`). secure_cookies: None (the default)
    marks cookies Secure unless the request reached the app as localhost/127.0.0.1/::1 over plain HTTP,
    and refuses to log anyone in over plain HTTP elsewhere (their browser would drop the cookie); True or
    False forces the attribute either way (True behind an HTTPS proxy that hides the scheme, False only on
    a closed network without HTTPS).
    """
    if session_hours <= 0:
        raise ValueError(f"session_hours is {session_hours}. A login must last some time; 12 is usual. Pass > 0.")
    policy = QualityPolicy(gold_accuracy_threshold, gold_min_answers, flagged_vote_weight)
    engine = make_engine(database_url)
    upgrade_database(engine)
    open_session = sessionmaker(engine, expire_on_commit=False)  # may write: IMMEDIATE on SQLite
    open_reader = sessionmaker(reader(engine), expire_on_commit=False)  # only reads: never the write lock
    templates = Jinja2Templates(directory=HERE / "templates")

    app = FastAPI(title="RLHF labeling", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def body_too_large(scope, size: int | None) -> Response:
        request = Request(scope)
        return page(request, "error.html", 413, status=413, message=body_too_large_message(size), viewer=None)

    # added before security_headers, so it runs inside it and its 413 page gets the same headers
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES, refuse=body_too_large)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        if not request.url.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    def page(request: Request, template: str, status_code: int = 200, **context) -> Response:
        return templates.TemplateResponse(request, template, context, status_code=status_code)

    def secure(request: Request) -> bool:
        return cookie_is_secure(request.url.scheme, request.url.hostname, secure_cookies)

    def require_usable_cookies(request: Request) -> None:
        """Refuse to start a login that could not work: a Secure cookie over plain HTTP is dropped by the browser."""
        if secure_cookies is None and secure(request) and request.url.scheme != "https":
            raise HTTPException(403, (
                f"This app is reached as {request.url.hostname!r} over plain HTTP, so it refuses to log anyone in: "
                "a password and a session cookie sent this way can be read by anyone on the network, and the "
                "browser drops the cookie, which is marked Secure. Open the app over HTTPS (behind a TLS proxy that "
                "sends X-Forwarded-Proto: https from an address in uvicorn's FORWARDED_ALLOW_IPS), or as "
                "http://localhost on the machine that serves it. On a closed network without HTTPS the admin can "
                "start it with `serve --no-secure-cookies`."))

    @app.exception_handler(LoginRequired)
    async def to_login(request: Request, _exc: LoginRequired):
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="lax", secure=secure(request))
        return response

    @app.exception_handler(HTTPException)
    async def error_page(request: Request, exc: HTTPException):
        response = page(request, "error.html", exc.status_code, status=exc.status_code, message=exc.detail,
                        viewer=None)
        response.headers.update(exc.headers or {})  # e.g. Retry-After on a 429, Allow on a 405
        return response

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        if any(error["loc"][0] == "path" for error in exc.errors()):
            message = (f"There is nothing at {request.url.path}: the address names an item that cannot exist. "
                       "Go back to your campaign list and continue from there.")
            return page(request, "error.html", 404, status=404, message=message, viewer=None)
        fields = ", ".join(str(error["loc"][-1]) for error in exc.errors())
        message = (f"The form's {fields} could not be read, so it cannot be processed. Reload the page and "
                   "try again.")
        return page(request, "error.html", 400, status=400, message=message, viewer=None)

    def database():
        with open_session() as db:
            yield db

    def reading():
        with open_reader() as db:
            yield db

    def viewer(request: Request, db: Session = Depends(reading)) -> Viewer:
        token = request.cookies.get(SESSION_COOKIE)
        login = accounts.find_session(db, token) if token else None
        if login is None:
            raise LoginRequired()
        found = Viewer(login.annotator_id, login.annotator.name, login.annotator.role, login.csrf_token)
        db.commit()  # end the read, so the snapshot is not kept for the rest of the request
        return found

    def admin(person: Viewer = Depends(viewer)) -> Viewer:
        if not person.is_admin:
            raise HTTPException(403, "This page is for campaign admins. Ask an admin if you need these figures.")
        return person

    def require_csrf(expected: str | None, given: str | None) -> None:
        if not accounts.tokens_match(expected, given):
            raise HTTPException(403, CSRF_REJECTED)

    def campaign_or_404(db: Session, name: str) -> Campaign:
        campaign = campaigns.find_campaign(db, name)
        if campaign is None:
            raise HTTPException(404, f"There is no campaign named {name!r}. Pick one from the list on the home page.")
        return campaign

    def login_form(request: Request, template: str, status_code: int = 200, **context) -> Response:
        token = request.cookies.get(LOGIN_CSRF_COOKIE) or accounts.new_token()
        response = page(request, template, status_code, csrf_token=token, viewer=None, **context)
        response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=secure(request))
        return response

    def logged_in(request: Request, annotator, db: Session) -> Response:
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, accounts.start_session(db, annotator, session_hours), httponly=True,
                            samesite="lax", secure=secure(request), max_age=int(session_hours * 3600))
        response.delete_cookie(LOGIN_CSRF_COOKIE, httponly=True, samesite="strict", secure=secure(request))
        return response

    def client_address(request: Request) -> str:
        # uvicorn puts the proxy's X-Forwarded-For here when the proxy is in FORWARDED_ALLOW_IPS
        return request.client.host if request.client else "unknown"

    def throttled(response: Response, admission: throttle.Admission) -> Response:
        response.headers["Retry-After"] = str(admission.retry_after_s)
        return response

    def too_many_tries(admission: throttle.Admission) -> str:
        return (
            f"Too many password tries for this account or from this network: {throttle.MAX_TRIES} within "
            f"{int(throttle.WINDOW.total_seconds())} seconds, so this one was refused without being checked. "
            f"Wait {admission.retry_after_s} seconds and try again; if the password is lost, ask a campaign admin "
            "for a new invite link, which sets a new one."
        )

    # -- accounts ---------------------------------------------------------------------------------------

    @app.get("/login")
    def login_page(request: Request):
        require_usable_cookies(request)
        return login_form(request, "login.html")

    @app.post("/login")
    def login(request: Request, name: str = Form(""), password: str = Form(""), csrf_token: str = Form(""),
              db: Session = Depends(database)):
        require_usable_cookies(request)
        require_csrf(request.cookies.get(LOGIN_CSRF_COOKIE), csrf_token)
        admission = throttle.admit(db, name, client_address(request))
        if admission.refused:  # before authenticate: a refused try costs no scrypt check
            return throttled(login_form(request, "login.html", 429, error=too_many_tries(admission), name=name),
                             admission)
        annotator = accounts.authenticate(db, name, password)
        if annotator is None:
            return login_form(request, "login.html", 401, error="Unknown name or wrong password.", name=name)
        throttle.succeeded(db, admission, name)
        return logged_in(request, annotator, db)

    def invite_or_404(db: Session, token: str) -> Annotator:
        invited = accounts.find_invite(db, token)
        db.commit()  # end the lookup's transaction (on SQLite, the write lock) before anything slow
        if invited is None:
            raise HTTPException(404, "This invite link is unknown, used or expired. Each link works once, for "
                                     f"{accounts.INVITE_DAYS} days. Ask a campaign admin for a new one.")
        return invited

    @app.get("/invite/{token}")
    def invite_page(request: Request, token: str, db: Session = Depends(database)):
        require_usable_cookies(request)
        admission = throttle.admit(db, None, client_address(request))  # a guessed link counts as a wrong try
        if admission.refused:
            raise HTTPException(429, too_many_tries(admission), headers={"Retry-After": str(admission.retry_after_s)})
        invited = invite_or_404(db, token)
        throttle.forgive(db, admission)
        return login_form(request, "invite.html", name=invited.name, token=token)

    @app.post("/invite/{token}")
    def accept_invite(request: Request, token: str, password: str = Form(""), confirm: str = Form(""),
                      csrf_token: str = Form(""), db: Session = Depends(database)):
        require_usable_cookies(request)
        require_csrf(request.cookies.get(LOGIN_CSRF_COOKIE), csrf_token)
        found = accounts.find_invite(db, token)
        admission = throttle.admit(db, found.name if found else None, client_address(request))
        if admission.refused:  # before accept_invite: a refused try costs no scrypt hash
            raise HTTPException(429, too_many_tries(admission), headers={"Retry-After": str(admission.retry_after_s)})
        invited = invite_or_404(db, token)
        if password != confirm:
            return login_form(request, "invite.html", 400, name=invited.name, token=token,
                              error="The two passwords differ, so neither was saved. Type the same password in "
                                    "both fields.")
        try:
            annotator = accounts.accept_invite(db, token, password)
        except accounts.AccountError as error:
            return login_form(request, "invite.html", 400, name=invited.name, token=token, error=str(error))
        throttle.succeeded(db, admission, annotator.name)
        return logged_in(request, annotator, db)

    @app.post("/logout")
    def logout(request: Request, csrf_token: str = Form(""), person: Viewer = Depends(viewer),
               db: Session = Depends(database)):
        require_csrf(person.csrf_token, csrf_token)
        accounts.end_session(db, request.cookies[SESSION_COOKIE])
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="lax", secure=secure(request))
        return response

    # -- annotators ---------------------------------------------------------------------------------------

    @app.get("/")
    def home(request: Request, person: Viewer = Depends(viewer), db: Session = Depends(reading)):
        annotator = _annotator(db, person)
        rows = [(c, campaigns.judged_count(db, c, annotator))
                for c in db.scalars(select(Campaign).order_by(Campaign.created_at.desc(), Campaign.id.desc()))]
        db.commit()
        return page(request, "home.html", viewer=person, campaigns=rows)

    @app.get("/campaigns/{name}/label")
    def label(request: Request, name: str, person: Viewer = Depends(viewer), db: Session = Depends(database)):
        campaign = campaign_or_404(db, name)
        annotator = _annotator(db, person)
        assignment = campaigns.next_assignment(db, campaign, annotator)
        judged = campaigns.judged_count(db, campaign, annotator)
        db.commit()
        if assignment is None:
            return page(request, "done.html", viewer=person, campaign=campaign, judged=judged)
        left, right = campaigns.shown_responses(assignment)
        return page(request, "label.html", viewer=person, campaign=campaign, judged=judged,
                    assignment_id=assignment.id, prompt=assignment.pair.prompt, left=left, right=right,
                    max_reason=campaigns.MAX_REASON_CHARS)

    @app.post("/assignments/{assignment_id}/vote")
    def vote(assignment_id: int = Path(ge=1, le=MAX_ID), choice: str = Form(""), reason: str = Form(""),
             csrf_token: str = Form(""), person: Viewer = Depends(viewer), db: Session = Depends(database)):
        require_csrf(person.csrf_token, csrf_token)
        assignment = db.get(Assignment, assignment_id)
        if assignment is None or assignment.annotator_id != person.annotator_id:
            raise HTTPException(404, "This item is not in your queue. Go back to your campaign list and continue.")
        if choice not in campaigns.SHOWN_CHOICES:
            raise HTTPException(400, f"The choice {choice!r} is unknown; the page sends one of "
                                     f"{', '.join(campaigns.SHOWN_CHOICES)}. Reload the page and choose again.")
        name = db.get(Campaign, assignment.campaign_id).name
        campaigns.record_vote(db, assignment, choice, reason)
        return RedirectResponse(f"/campaigns/{name}/label", status_code=303)

    # -- admins -------------------------------------------------------------------------------------------

    def admin_overview(request: Request, person: Viewer, db: Session, status_code: int = 200, **context):
        rows = []
        for campaign in db.scalars(select(Campaign).order_by(Campaign.created_at.desc(), Campaign.id.desc())):
            rows.append((campaign, results.progress(db, campaign), results.figures(db, campaign, policy).kappa))
        db.commit()
        return page(request, "admin.html", status_code, viewer=person, campaigns=rows, **context)

    @app.get("/admin")
    def admin_page(request: Request, person: Viewer = Depends(admin), db: Session = Depends(reading)):
        return admin_overview(request, person, db)

    @app.post("/admin/invite")
    def admin_invite(request: Request, name: str = Form(""), role: str = Form("annotator"),
                     csrf_token: str = Form(""), person: Viewer = Depends(admin), db: Session = Depends(database),
                     read: Session = Depends(reading)):
        require_csrf(person.csrf_token, csrf_token)
        try:
            token = accounts.invite(db, name.strip(), role)
        except accounts.AccountError as error:
            db.rollback()
            return admin_overview(request, person, read, 400, error=str(error))
        link = f"{str(request.base_url).rstrip('/')}/invite/{token}"
        return admin_overview(request, person, read, invited=name.strip(), invite_link=link)

    @app.get("/admin/campaigns/{name}")
    def admin_campaign(request: Request, name: str, person: Viewer = Depends(admin),
                       db: Session = Depends(reading)):
        campaign = campaign_or_404(db, name)
        figures = results.figures(db, campaign, policy)
        status_counts = _outcome_counts(figures.outcomes.values())
        context = dict(viewer=person, campaign=campaign, progress=results.progress(db, campaign), figures=figures,
                       outcomes=status_counts, policy=policy)
        db.commit()
        return page(request, "admin_campaign.html", **context)

    @app.get("/admin/campaigns/{name}/export.parquet")
    def admin_export(name: str, person: Viewer = Depends(admin), db: Session = Depends(reading)):
        campaign = campaign_or_404(db, name)
        exported, _left_out = results.export_comparisons(db, campaign, policy)  # one snapshot, no write lock
        db.commit()
        with tempfile.TemporaryDirectory() as folder:
            path = FilePath(folder) / f"{name}.parquet"
            write_comparisons(exported, path)
            body = path.read_bytes()
        return Response(body, media_type="application/vnd.apache.parquet",
                        headers={"Content-Disposition": f'attachment; filename="{name}.parquet"'})

    return app


def _annotator(db: Session, person: Viewer) -> Annotator:
    return db.get(Annotator, person.annotator_id)


def _outcome_counts(outcomes) -> dict[str, int]:
    """'majority: a' etc. -> how many pairs; the admin page's verdict breakdown."""
    counts: dict[str, int] = {}
    for outcome in outcomes:
        key = f"majority: {outcome.choice}" if outcome.status == "majority" else outcome.status
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
