"""The labeling web app: server-rendered pages for annotators and admins.

`create_app(database_url, ...)` migrates the database to the latest schema and returns the
FastAPI app. Annotators reach only: login, invite, their campaign list, their current item and
the vote on it. Admins also reach /admin (progress, agreement, gold accuracy, invites, export).

Rules every route keeps:
- a page or response an annotator can fetch never carries a gold answer or says which pair is gold;
- an annotator reads and votes only on their own queue (another's item is a 404, as if absent);
- every POST carries a CSRF token: the session's, or before login the double-submit cookie's;
- each vote is committed before the redirect that shows the next pair.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Form, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException

from rlhf.comparisons import write_comparisons
from rlhf.labeling import accounts, campaigns, results
from rlhf.labeling.aggregate import QualityPolicy
from rlhf.labeling.db import Annotator, Assignment, Campaign, make_engine, upgrade_database

HERE = Path(__file__).parent
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
               gold_min_answers: int = 3, flagged_vote_weight: float = 0.0, secure_cookies: bool = False) -> FastAPI:
    """The app on this database (SQLite file or PostgreSQL URL), migrated to the latest schema.

    session_hours: a login lasts this long. The three quality settings decide who is flagged on gold
    and what their votes weigh (see `aggregate.QualityPolicy`). secure_cookies: set behind HTTPS.
    """
    if session_hours <= 0:
        raise ValueError(f"session_hours is {session_hours}. A login must last some time; 12 is usual. Pass > 0.")
    policy = QualityPolicy(gold_accuracy_threshold, gold_min_answers, flagged_vote_weight)
    engine = make_engine(database_url)
    upgrade_database(engine)
    open_session = sessionmaker(engine, expire_on_commit=False)
    templates = Jinja2Templates(directory=HERE / "templates")

    app = FastAPI(title="RLHF labeling", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        if not request.url.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    def page(request: Request, template: str, status_code: int = 200, **context) -> Response:
        return templates.TemplateResponse(request, template, context, status_code=status_code)

    @app.exception_handler(LoginRequired)
    async def to_login(request: Request, _exc: LoginRequired):
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    @app.exception_handler(HTTPException)
    async def error_page(request: Request, exc: HTTPException):
        return page(request, "error.html", exc.status_code, status=exc.status_code, message=exc.detail, viewer=None)

    @app.exception_handler(RequestValidationError)
    async def bad_form(request: Request, exc: RequestValidationError):
        fields = ", ".join(str(error["loc"][-1]) for error in exc.errors())
        message = f"The form arrived without {fields}, so it cannot be processed. Reload the page and try again."
        return page(request, "error.html", 400, status=400, message=message, viewer=None)

    def database():
        with open_session() as db:
            yield db

    def viewer(request: Request, db: Session = Depends(database)) -> Viewer:
        token = request.cookies.get(SESSION_COOKIE)
        login = accounts.find_session(db, token) if token else None
        if login is None:
            raise LoginRequired()
        found = Viewer(login.annotator_id, login.annotator.name, login.annotator.role, login.csrf_token)
        db.commit()  # end the read: SQLite's write lock is taken at BEGIN, so keep transactions short
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
        response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=secure_cookies)
        return response

    def logged_in(annotator, db: Session) -> Response:
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, accounts.start_session(db, annotator, session_hours), httponly=True,
                            samesite="lax", secure=secure_cookies, max_age=int(session_hours * 3600))
        response.delete_cookie(LOGIN_CSRF_COOKIE)
        return response

    # -- accounts ---------------------------------------------------------------------------------------

    @app.get("/login")
    def login_page(request: Request):
        return login_form(request, "login.html")

    @app.post("/login")
    def login(request: Request, name: str = Form(""), password: str = Form(""), csrf_token: str = Form(""),
              db: Session = Depends(database)):
        require_csrf(request.cookies.get(LOGIN_CSRF_COOKIE), csrf_token)
        annotator = accounts.authenticate(db, name, password)
        if annotator is None:
            return login_form(request, "login.html", 401, error="Unknown name or wrong password.", name=name)
        return logged_in(annotator, db)

    @app.get("/invite/{token}")
    def invite_page(request: Request, token: str, db: Session = Depends(database)):
        invited = accounts.find_invite(db, token)
        if invited is None:
            raise HTTPException(404, "This invite link is unknown, used or expired. Ask the admin for a new one.")
        return login_form(request, "invite.html", name=invited.name, token=token)

    @app.post("/invite/{token}")
    def accept_invite(request: Request, token: str, password: str = Form(""), confirm: str = Form(""),
                      csrf_token: str = Form(""), db: Session = Depends(database)):
        require_csrf(request.cookies.get(LOGIN_CSRF_COOKIE), csrf_token)
        invited = accounts.find_invite(db, token)
        if invited is None:
            raise HTTPException(404, "This invite link is unknown, used or expired. Ask the admin for a new one.")
        if password != confirm:
            return login_form(request, "invite.html", 400, name=invited.name, token=token,
                              error="The two passwords differ. Type the same password twice.")
        try:
            annotator = accounts.accept_invite(db, token, password)
        except accounts.AccountError as error:
            return login_form(request, "invite.html", 400, name=invited.name, token=token, error=str(error))
        return logged_in(annotator, db)

    @app.post("/logout")
    def logout(request: Request, csrf_token: str = Form(""), person: Viewer = Depends(viewer),
               db: Session = Depends(database)):
        require_csrf(person.csrf_token, csrf_token)
        accounts.end_session(db, request.cookies[SESSION_COOKIE])
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    # -- annotators ---------------------------------------------------------------------------------------

    @app.get("/")
    def home(request: Request, person: Viewer = Depends(viewer), db: Session = Depends(database)):
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
    def vote(assignment_id: int, choice: str = Form(""), reason: str = Form(""), csrf_token: str = Form(""),
             person: Viewer = Depends(viewer), db: Session = Depends(database)):
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
    def admin_page(request: Request, person: Viewer = Depends(admin), db: Session = Depends(database)):
        return admin_overview(request, person, db)

    @app.post("/admin/invite")
    def admin_invite(request: Request, name: str = Form(""), role: str = Form("annotator"),
                     csrf_token: str = Form(""), person: Viewer = Depends(admin), db: Session = Depends(database)):
        require_csrf(person.csrf_token, csrf_token)
        try:
            token = accounts.invite(db, name.strip(), role)
        except accounts.AccountError as error:
            return admin_overview(request, person, db, 400, error=str(error))
        link = f"{str(request.base_url).rstrip('/')}/invite/{token}"
        return admin_overview(request, person, db, invited=name.strip(), invite_link=link)

    @app.get("/admin/campaigns/{name}")
    def admin_campaign(request: Request, name: str, person: Viewer = Depends(admin),
                       db: Session = Depends(database)):
        campaign = campaign_or_404(db, name)
        figures = results.figures(db, campaign, policy)
        status_counts = _outcome_counts(figures.outcomes.values())
        context = dict(viewer=person, campaign=campaign, progress=results.progress(db, campaign), figures=figures,
                       outcomes=status_counts, policy=policy)
        db.commit()
        return page(request, "admin_campaign.html", **context)

    @app.get("/admin/campaigns/{name}/export.parquet")
    def admin_export(name: str, person: Viewer = Depends(admin), db: Session = Depends(database)):
        campaign = campaign_or_404(db, name)
        exported, _left_out = results.export_comparisons(db, campaign, policy)
        db.commit()
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{name}.parquet"
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
