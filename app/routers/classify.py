"""Classification with a deployed classifier checkpoint, in the shape of vLLM's `/classify`."""

from fastapi import APIRouter

from app.auth import Reader
from app.deps import EnginesDep
from app.errors import NOT_READY
from app.protocols import classify as protocol
from app.protocols.classify import ClassifyRequest

router = APIRouter(tags=["classification"], dependencies=[Reader], responses=NOT_READY)


@router.post("/classify")
async def classify(body: ClassifyRequest, engines: EnginesDep) -> dict:
    return await protocol.classify(engines, body)
