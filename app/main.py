"""The FastAPI application: `create_app(settings)` wires the database, the routers and the error format."""

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.db import Database
from app.errors import error_body, install_error_handlers
from app.queue import make_celery
from app.reaper import reap_forever
from app.routers import checkpoints, classify, corpora, deployments, generation, jobs, keys, openai_compat
from app.serving import DeploymentManager, follow_deployments
from app.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        app.state.settings = settings
        app.state.database = Database(settings.sqlalchemy_url)
        app.state.celery = make_celery(settings)
        reaper = asyncio.create_task(reap_forever(app.state.database, app.state.celery, settings))
        app.state.deployments = DeploymentManager(app.state.database, settings.data_dir, settings.serving_max_batch,
                                                  settings.serving_max_queue)
        follower = asyncio.create_task(follow_deployments(app.state.deployments, settings))
        yield
        reaper.cancel()
        follower.cancel()
        await run_in_threadpool(app.state.deployments.stop)
        app.state.database.dispose()

    app = FastAPI(title="ScratchLLM", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(corpora.router)
    app.include_router(jobs.router)
    app.include_router(checkpoints.router)
    app.include_router(keys.router)
    app.include_router(deployments.router)
    app.include_router(generation.router)
    app.include_router(classify.router)
    app.include_router(openai_compat.router)
    app.include_router(generation.router, prefix="/d/{deployment}")

    @app.get("/livez", tags=["health"])
    def livez() -> dict:
        return {"status": "ok"}

    @app.get("/health", tags=["health"])
    async def health():
        def database_answers() -> None:
            with app.state.database.engine.connect() as connection:
                connection.execute(text("SELECT 1"))

        try:
            await run_in_threadpool(database_answers)
        except Exception as e:  # any failure to reach the database means not ready
            return JSONResponse(error_body(503, f"the database does not answer: {type(e).__name__}"), 503)
        return {"status": "ok"}

    return app
