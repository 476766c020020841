"""The dashboard: one page and its assets (app/dashboard), public like the API's description. It holds no data
itself: the page asks for a key, keeps it in the browser, and sends it with every call it makes to the API."""

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from app.auth import DASHBOARD_ASSETS, DASHBOARD_PAGE

DASHBOARD = Path(__file__).resolve().parents[1] / "dashboard"
# everything from this server, nothing inline: no CDN, and no script an API answer could inject
POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
          "frame-ancestors 'none'")

router = APIRouter(include_in_schema=False)


@router.get(DASHBOARD_PAGE)
def page() -> FileResponse:
    return FileResponse(DASHBOARD / "index.html",
                        headers={"Content-Security-Policy": POLICY, "Cache-Control": "no-cache"})


def mount_assets(app: FastAPI) -> None:
    app.mount(DASHBOARD_ASSETS.rstrip("/"), StaticFiles(directory=DASHBOARD), name="dashboard")
