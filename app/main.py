"""The FastAPI application: `create_app(settings)` wires the database, the routers and the error format."""

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.db import Database
from app.errors import error_body, install_error_handlers
from app.metrics import CountRequests, Metrics
from app.queue import make_celery
from app.reaper import reap_forever
from app.routers import (
    checkpoints,
    classify,
    corpora,
    deployments,
    evaluations,
    generation,
    jobs,
    keys,
    openai_compat,
)
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
                                                  settings.serving_max_queue, app.state.metrics)
        follower = asyncio.create_task(follow_deployments(app.state.deployments, settings))
        yield
        reaper.cancel()
        follower.cancel()
        await run_in_threadpool(app.state.deployments.stop)
        app.state.database.dispose()

    app = FastAPI(title="ScratchLLM", version="0.1.0", lifespan=lifespan)
    app.state.metrics = metrics = Metrics()
    install_error_handlers(app)

    app.add_middleware(CountRequests, metrics=metrics)
    app.include_router(corpora.router)
    app.include_router(jobs.router)
    app.include_router(checkpoints.router)
    app.include_router(evaluations.router)
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
        """Ready: the database answers and the default deployment is loaded; 503 with the reason otherwise."""
        def database_answers() -> None:
            with app.state.database.engine.connect() as connection:
                connection.execute(text("SELECT 1"))

        try:
            await run_in_threadpool(database_answers)
        except Exception as e:  # any failure to reach the database means not ready
            return JSONResponse(error_body(503, f"the database does not answer: {type(e).__name__}"), 503)
        served = app.state.deployments.get(None)
        if served is None or served.current is None:
            reason = "no default deployment" if served is None else (
                served.error or f"the default deployment {served.name} is loading")
            return JSONResponse(error_body(503, reason, type_="unavailable"), 503)
        return {"status": "ok", "default_deployment": served.name, "checkpoint_id": served.current.checkpoint_id}

    @app.get("/metrics", tags=["health"])
    def prometheus_metrics() -> Response:
        with app.state.deployments.lock:
            engines = [(s.name, s.current.engine) for s in app.state.deployments.served.values()
                       if s.current is not None and s.current.engine is not None]
        for name, engine in engines:
            waiting, running = engine.load
            metrics.queue_depth.labels(name).set(waiting)
            metrics.running.labels(name).set(running)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
