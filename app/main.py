"""The FastAPI application: `create_app(settings)` wires the services, the routers and the error format."""

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.auth import Authenticate, Reader, document_security
from app.bodies import LimitBodies
from app.deps import Services, ServicesDep
from app.errors import error_body, install_error_handlers
from app.metrics import CountRequests, Metrics
from app.reaper import reap_forever
from app.routers import (
    checkpoints,
    classify,
    corpora,
    dashboard,
    deployments,
    evaluations,
    generation,
    jobs,
    keys,
    openai_compat,
    tokens,
)
from core.db import Database
from core.queue import JobQueue
from core.settings import Settings, settings_from_environment
from serving.client import EngineClient
from serving.deployments import DeploymentManager, follow_deployments


def _services(settings: Settings, metrics: Metrics) -> Services:
    database = Database(settings.sqlalchemy_url)
    manager = DeploymentManager(database, settings.storage, settings.serving_max_batch, settings.serving_max_queue,
                                metrics, settings.max_serving_memory_bytes, settings.serving_gpu_memory_fraction)
    engines = EngineClient(manager, metrics, settings.generation_timeout_s, settings.serving_max_prompt_chars,
                           settings.serving_max_classify_batches)
    return Services(settings=settings, database=database, queue=JobQueue(settings), deployments=manager,
                    engines=engines, metrics=metrics)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or settings_from_environment()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        services = app.state.services = _services(settings, metrics)
        reaper = asyncio.create_task(reap_forever(services.database, services.queue, settings))
        follower = asyncio.create_task(follow_deployments(services.deployments, settings))
        yield
        reaper.cancel()
        follower.cancel()
        await run_in_threadpool(services.deployments.stop)
        services.database.dispose()

    app = FastAPI(title="ScratchLLM", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)

    app.include_router(corpora.router)
    app.include_router(jobs.router)
    app.include_router(checkpoints.router)
    app.include_router(evaluations.router)
    app.include_router(keys.router)
    app.include_router(keys.caller_router)
    app.include_router(deployments.router)
    app.include_router(generation.router)
    app.include_router(classify.router)
    app.include_router(openai_compat.router)
    app.include_router(tokens.router)
    app.include_router(generation.router, prefix="/d/{deployment}")
    app.include_router(tokens.deployment_router, prefix="/d/{deployment}")
    app.include_router(dashboard.router)
    dashboard.mount_assets(app)
    # the last added runs first: count every request, then know the caller, then read a bounded body
    app.add_middleware(LimitBodies, limit=settings.max_request_bytes)
    app.add_middleware(Authenticate, settings=settings)
    app.add_middleware(CountRequests, metrics=metrics)

    @app.get("/livez", tags=["health"])
    def livez() -> dict:
        return {"status": "ok"}

    @app.get("/health", tags=["health"], responses={503: {"description": "not ready: the database does not answer, "
                                                          "or the default deployment is missing or not loaded"}})
    async def health(services: ServicesDep):
        """Ready: the database answers and the default deployment is loaded; 503 with the reason otherwise.
        Public, so it names no deployment or checkpoint (GET /v1/deployments does, with a key)."""
        def database_answers() -> None:
            with services.database.engine.connect() as connection:
                connection.execute(text("SELECT 1"))

        try:
            await run_in_threadpool(database_answers)
        except Exception as e:  # any failure to reach the database means not ready
            return JSONResponse(error_body(503, f"the database does not answer: {type(e).__name__}"), 503)
        served = services.deployments.get(None)
        if served is None or served.current is None:
            reason = "no default deployment" if served is None else (
                "the default deployment failed to load" if served.error else "the default deployment is loading")
            return JSONResponse(error_body(503, reason, type_="unavailable"), 503)
        return {"status": "ok"}

    @app.get("/metrics", tags=["health"], dependencies=[Reader])
    def prometheus_metrics(services: ServicesDep) -> Response:
        for name, engine in services.deployments.engines():
            waiting, running = engine.load
            metrics.queue_depth.labels(name).set(waiting)
            metrics.running.labels(name).set(running)
        metrics.memory.clear()  # a deployment moved or gone leaves no stale series
        for served in services.deployments.all():
            if served.current is not None:
                placement = served.current.placement
                metrics.memory.labels(served.name, str(placement.device), placement.dtype_name).set(
                    served.current.memory_bytes)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    build_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = document_security(build_openapi())
        return app.openapi_schema

    app.openapi = openapi
    return app
