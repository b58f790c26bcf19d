"""`create_app`: the FastAPI app serving one engine through the OpenAI API.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}], POST /tokenize and
/detokenize (kiln.serve.tokenize_routes) (API key checked when keys are configured); GET /health
(liveness: 503 only once the engine is down for good), GET /ready (readiness: 503 until the engine has
started, while it is down, and once draining begins), GET /metrics (Prometheus), GET /version; GET /
(the chat page) and GET /docs (Swagger UI), every asset served from installed packages
(kiln.serve.chat_page).

Lifecycle: the app's startup begins starting the engine (for a `LoadingEngine`: loading it) in the
background and returns at once, so the port answers /health while a big model loads; the server is
ready when the engine runs, and from then on `supervise` watches it (kiln.serve.supervisor). If it
cannot start, or goes down for good, /ready says "failed" and `on_engine_failure` is told. On shutdown
the app stops accepting work and (unless told otherwise) shuts the engine down.

gRPC: with `grpc_port` set, the lifespan also runs the gRPC front end (kiln.serve.grpc.server, as
`app.state.kiln_grpc`): started before the engine, stopped before it, each of its calls run through
this app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from kiln.clients.protocol import EngineClient
from kiln.serve.admin import add_admin_routes
from kiln.serve.admission import Admission
from kiln.serve.auth import require_api_key
from kiln.serve.background_responses import cancel_all
from kiln.serve.chat import create_chat_completion
from kiln.serve.chat_page import add_chat_page, add_docs_page
from kiln.serve.chat_tools import renders_tools, tool_format
from kiln.serve.completions import create_completion
from kiln.serve.errors import install_error_handlers
from kiln.serve.metrics import ServerMetrics
from kiln.serve.middleware import BodyLimitMiddleware, RequestContextMiddleware
from kiln.serve.openapi import Responses, install_openapi, key_responses
from kiln.serve.protocol import ModelCard, ModelList
from kiln.serve.response_store import ResponseStore
from kiln.serve.responses import create_response
from kiln.serve.rollout import Rollout
from kiln.serve.sampling import model_sampling_defaults
from kiln.serve.settings import ServerSettings
from kiln.serve.slo import SloBatching
from kiln.serve.state import ServerState, server_state
from kiln.serve.stored_responses import cancel_response, delete_response, get_response, list_input_items
from kiln.serve.supervisor import supervise
from kiln.serve.tokenize_routes import add_tokenize_routes
from kiln.version import __version__

logger = logging.getLogger("kiln.serve")


def _model_card(state: ServerState) -> ModelCard:
    info = state.engine.model_info
    tokenizer = state.engine.tokenizer
    template = tokenizer.hf.chat_template if renders_tools(tokenizer) else None
    return ModelCard(
        id=state.model_name,
        max_model_len=info.max_model_len,
        backend=info.backend,
        tool_call_format=tool_format(template, state.settings.tool_call_parser),
        reasoning_parser=state.settings.reasoning_parser,
        sampling_defaults=state.sampling_defaults,
    )


async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_model_card(server_state(request))])


async def get_model(model_id: str, request: Request) -> ModelCard:
    state = server_state(request)
    state.check_model(model_id)
    return _model_card(state)


async def health(request: Request) -> JSONResponse:
    """Liveness: 200 while the process can serve or recover (loading, restarting the engine); 503 once
    the engine is down for good."""
    failed = server_state(request).admission.failed
    if failed is not None:
        return JSONResponse({"status": "failed", "error": failed}, status_code=503)
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> JSONResponse:
    admission = server_state(request).admission
    if admission.failed is not None:
        return JSONResponse({"status": "failed", "error": admission.failed}, status_code=503)
    if admission.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if admission.down is not None:
        return JSONResponse({"status": "restarting", "error": admission.down}, status_code=503)
    if not admission.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    body, content_type = server_state(request).metrics.render()
    return Response(body, media_type=content_type)


async def version(request: Request) -> dict[str, str]:
    state = server_state(request)
    info = state.engine.model_info
    return {"version": __version__, "model": state.model_name, "backend": info.backend, "dtype": info.dtype}


def create_app(
    engine: EngineClient,
    settings: ServerSettings,
    *,
    shutdown_engine: bool = True,
    rollout: Rollout | None = None,
) -> FastAPI:
    """Build the app for `engine`. `shutdown_engine=False` leaves the engine running when the app
    stops (for an engine shared by several apps, as in tests). With a model repository, `rollout` is its
    control plane and `engine` its router (`rollout.router`): the app polls and serves the admin API."""
    if rollout is not None and engine is not rollout.router:
        raise ValueError("a rollout's app serves its router")
    admission = Admission(
        max_waiting_sequences=settings.max_waiting_sequences,
        max_waiting_tokens=settings.max_waiting_tokens,
        retry_after_seconds=settings.retry_after_seconds,
    )
    server_metrics = ServerMetrics(engine.stats, lambda: admission.waiting_requests)
    slo = SloBatching.from_settings(settings, admission, server_metrics)  # None without SLO targets
    state = ServerState(
        engine=engine,
        settings=settings,
        admission=admission,
        metrics=server_metrics,
        slo=slo,
        responses=ResponseStore(settings.responses_store_size),
    )

    def engine_failed(error: BaseException) -> None:
        if state.on_engine_failure is not None:
            state.on_engine_failure(error)

    async def start_engine() -> None:
        try:
            await engine.start()
            if slo is not None:
                await slo.attach(engine)  # SloUnsupportedError: the engine cannot change its batching
        except Exception as exc:
            logger.exception("the engine failed to start")
            admission.failed = str(exc) or type(exc).__name__
            engine_failed(exc)
            return
        info = engine.model_info
        state.sampling_defaults = model_sampling_defaults(info, settings.generation_config)
        admission.ready = True
        logger.info("ready: serving %s (%s, %s)", state.model_name, info.backend, info.dtype)
        if state.sampling_defaults:
            logger.info(
                "sampling defaults from the model's generation config: %s (a request's own fields win; "
                "--generation-config none turns them off)",
                ", ".join(f"{k}={v:g}" for k, v in state.sampling_defaults.items()),
            )
        if slo is not None:
            slo.start()
        if rollout is not None:
            rollout_polling = asyncio.ensure_future(rollout.run())
            try:
                await supervise(state, engine_failed)
            finally:
                rollout_polling.cancel()
                await rollout.close()
            return
        await supervise(state, engine_failed)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        grpc_front = None
        if settings.grpc_port is not None:
            from kiln.serve.grpc.server import GrpcFrontEnd  # deferred: grpcio loads only with --grpc-port

            grpc_front = app.state.kiln_grpc = GrpcFrontEnd(app, state)
            await grpc_front.start()  # a port that cannot be bound fails the startup
        running = asyncio.ensure_future(start_engine())
        try:
            yield
        finally:
            admission.draining = True
            if slo is not None:
                await slo.stop()
            if grpc_front is not None:
                await grpc_front.stop()  # its calls in flight end before the engine does
            await cancel_all(state)  # background responses still running
            if not running.done():
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running
            if shutdown_engine:
                await engine.shutdown()

    # With `key_protects_all`, the API docs are served by routes of their own, behind the key.
    open_docs = not settings.key_protects_all
    app = FastAPI(
        title="Kiln",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,  # served by kiln.serve.chat_page, from local assets
        openapi_url="/openapi.json" if open_docs else None,
        redoc_url=None,
    )
    app.state.kiln = state
    if rollout is not None:
        rollout.metrics.register(server_metrics.registry)
        if settings.admin_key is not None:
            add_admin_routes(app, rollout)  # /admin/..., behind its own key
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-Id", "Retry-After"],
        )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware, metrics=server_metrics)

    # `responses=`: the statuses each route sends, for /openapi.json (kiln.serve.openapi).
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=key_responses(settings))
    v1.add_api_route(
        "/chat/completions",
        create_chat_completion,
        methods=["POST"],
        response_model=None,
        responses=Responses.chat,
    )
    v1.add_api_route(
        "/completions",
        create_completion,
        methods=["POST"],
        response_model=None,
        responses=Responses.completions,
    )
    v1.add_api_route(
        "/responses", create_response, methods=["POST"], response_model=None, responses=Responses.responses
    )
    v1.add_api_route(
        "/responses/{response_id}",
        get_response,
        methods=["GET"],
        response_model=None,
        responses=Responses.stored_response,
    )
    v1.add_api_route(
        "/responses/{response_id}", delete_response, methods=["DELETE"], responses=Responses.deleted_response
    )
    v1.add_api_route(
        "/responses/{response_id}/cancel",
        cancel_response,
        methods=["POST"],
        response_model=None,
        responses=Responses.cancel_response,
    )
    v1.add_api_route(
        "/responses/{response_id}/input_items",
        list_input_items,
        methods=["GET"],
        responses=Responses.input_items,
    )
    v1.add_api_route("/models", list_models, methods=["GET"], responses=Responses.models)
    v1.add_api_route("/models/{model_id:path}", get_model, methods=["GET"], responses=Responses.model)
    app.include_router(v1)
    add_tokenize_routes(app, settings)  # POST /tokenize, /detokenize (vLLM's), behind the key like /v1
    app.add_api_route("/health", health, methods=["GET"], responses=Responses.health)
    app.add_api_route("/ready", ready, methods=["GET"], responses=Responses.ready)
    # Probes never need the key; scrapers and readers of the docs do when `key_protects_all` is set.
    guarded = [Depends(require_api_key)] if settings.key_protects_all else []
    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False, dependencies=guarded)
    version_responses = {**Responses.version, **key_responses(settings, bool(guarded))}
    app.add_api_route("/version", version, methods=["GET"], dependencies=guarded, responses=version_responses)
    if not open_docs:

        async def openapi_document() -> JSONResponse:
            return JSONResponse(app.openapi())

        app.add_api_route(
            "/openapi.json", openapi_document, methods=["GET"], include_in_schema=False, dependencies=guarded
        )
    add_docs_page(app, dependencies=guarded)  # /docs and its Swagger UI assets, no CDN
    add_chat_page(app)  # / and /static
    install_openapi(app)  # FastAPI's document, finished to tell the truth (kiln.serve.openapi)
    return app
