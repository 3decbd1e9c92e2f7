"""`umbrella serve`: one loaded model over HTTP (FastAPI), with the viewer page.

    app = create_app("runs/sex__tiny__ab12cd34/seed_0", eval_dir=".../evaluation",
                     data_roots={"T1": "/data/t1"})
    uvicorn.run(app, host="127.0.0.1", port=8000)

API (OpenAPI at ``/docs``; every route needs the token when one is set)::

    GET  /api/info                        model, modalities, trained tasks (null: unknown)
    POST /api/scans          (multipart)  upload a NIfTI (fields: modality, file) -> scan
    POST /api/scans/path     (JSON)       register a file under a data root -> scan
    GET  /api/scans/{id}/original.nii.gz  the scan as shown (4D mean, dMRI map)
    GET  /api/scans/{id}/input.nii.gz     the model's input, placed over the original
    GET  /api/scans/{id}/timecourse?x=&y=&z=  rsfMRI signal at a voxel
    POST /api/ask            (JSON)       {question, scans: [id] | images: [{modality, path}]}
    POST /api/ask/upload     (multipart)  question, modality, file: upload and ask at once
    GET  /api/eval                        metrics, prediction table (wrong first), plot names
    GET  /api/eval/plots/{name}           one of the evaluation's PNG plots
    POST /api/eval/open      (JSON)       {record_id} -> the record's scans, registered

Safety: the model sits behind one lock (requests are answered one at a time, in order);
client paths stay inside the data roots (403); uploads are size-limited (413) and read with the
project's NIfTI reader before use (400 otherwise); with a token every request must carry it
(``Authorization: Bearer``, ``X-Umbrella-Token`` or ``?token=``; 401 otherwise).
"""

from __future__ import annotations

import hmac
import ipaddress
import shutil
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, model_validator

from umbrella.errors import ConfigError, UmbrellaError
from umbrella.inference import BrainAssistant
from umbrella.serve.evaluation import EvaluationData
from umbrella.serve.scans import (
    PathRefused,
    ScanStore,
    UnknownScan,
    resolve_under_root,
    time_course,
    view_bytes,
)

STATIC = Path(__file__).parent / "static"
MODALITIES = ("T1", "rsfMRI", "dMRI")
Modality = Literal["T1", "rsfMRI", "dMRI"]


# ----------------------------------------------------------------------------- request bodies

class PathImage(BaseModel):
    modality: Modality
    path: str = Field(min_length=1, max_length=4096, description="relative to the data root")


class ScanPath(PathImage):
    pass


class AskRequest(BaseModel):
    question: str = Field(min_length=1, max_length=2000)
    scans: list[str] = Field(default_factory=list, description="scan ids, in <image> order")
    images: list[PathImage] = Field(default_factory=list, description="files under data roots")
    max_new_tokens: int = Field(32, ge=1, le=256)

    @model_validator(mode="after")
    def _some_image(self):
        if not self.scans and not self.images:
            raise ValueError("give at least one scan id (scans) or server path (images)")
        return self


class OpenRecord(BaseModel):
    record_id: str = Field(min_length=1, max_length=512)


class OptionProb(BaseModel):
    option: str
    prob: float


class AskResponse(BaseModel):
    question: str
    answer: str = Field(description="the model's generated answer")
    task: str | None = Field(description="the trained task the question matches")
    known: bool | None = Field(description="false: matches no trained task; null: tasks unknown")
    notice: str | None
    kind: str | None = Field(description="classification, regression or null")
    options: list[OptionProb] | None = Field(
        description="classification: likelihood-scored probability of every option")
    value: float | None = Field(description="regression: the number in the answer")
    unit: str
    distribution: dict | None = Field(
        description="regression: {values, probs} over candidate values (not filled yet)")
    scans: list[dict]
    seconds: float


# ----------------------------------------------------------------------------- safety helpers

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """A non-loopback address needs a token: anyone who can reach it could use the model."""
    if not is_loopback(host) and not token:
        raise ConfigError(f"--host {host} is reachable from other machines: give --token or set "
                          "UMBRELLA_TOKEN (clients then send it), or bind 127.0.0.1")


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 (by its declared
    Content-Length at once, or as soon as more bytes arrive than allowed)."""

    class TooLarge(Exception):
        pass

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen, over, started = 0, False, False

        async def counted():
            nonlocal seen, over
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                over = True
                raise BodyLimit.TooLarge
            return message

        async def tracked_send(message):
            # the app may turn the interrupted body into its own error (FastAPI answers 400
            # "error parsing the body"): once the limit was passed, the answer is 413
            nonlocal started
            if over:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._refuse(send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked_send)
        except BodyLimit.TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send):
        mb = self.limit / 2**20
        response = JSONResponse({"detail": f"request body larger than {mb:.3g} MB; raise "
                                           "--max-upload-mb or send a smaller file"}, 413)
        await response({"type": "http"}, None, send)


def _token_of(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-umbrella-token") or request.query_params.get("token") or ""


# ----------------------------------------------------------------------------- the app

class ServeState:
    """What the routes share: the model (behind ``lock``), the scans, the evaluation."""

    def __init__(self, assistant: BrainAssistant, roots: dict[str, Path],
                 evaluation: EvaluationData | None, max_upload: int):
        self.assistant, self.roots, self.evaluation = assistant, roots, evaluation
        self.max_upload = max_upload
        self.lock = threading.Lock()
        self.scans = ScanStore()
        self.scans.on_drop = lambda scan: assistant.forget(scan.path)

    def spec(self, modality: str):
        return self.assistant.inputs.get(modality)

    def info(self) -> dict:
        a = self.assistant
        tasks = None if a.tasks is None else {
            name: {k: e.get(k) for k in ("kind", "options", "unit", "questions", "n_images")}
            for name, e in a.tasks.items()}
        return {"model": str(a.model_dir), "modalities": list(a.inputs), "tasks": tasks,
                "tasks_note": None if tasks is not None else
                "tasks unknown: this model was trained before tasks.json was saved",
                "evaluation": self.evaluation is not None,
                "data_roots": sorted(self.roots), "max_upload_mb": self.max_upload / 2**20}

    def upload(self, modality: str, file: UploadFile):
        if modality not in MODALITIES:
            raise HTTPException(422, f"modality must be one of {', '.join(MODALITIES)}")
        name = Path(file.filename or "").name
        from umbrella.serve.scans import is_nifti_name

        if not is_nifti_name(name):
            raise HTTPException(400, f"{name or 'the upload'} is not a NIfTI file name (.nii or "
                                     ".nii.gz); convert DICOM with dcm2niix first")
        target = self.scans.new_upload_path(name)
        with open(target, "wb") as out:
            shutil.copyfileobj(file.file, out, 1 << 20)
        return self.scans.add(modality, target, name, temporary=True)

    def by_path(self, modality: str, path: str):
        real = resolve_under_root(path, modality, self.roots)
        shown = str(real.relative_to(self.roots[modality].resolve()))
        return self.scans.add(modality, real, shown, temporary=False)

    def ask(self, question: str, scans: list, max_new_tokens: int) -> AskResponse:
        start = time.perf_counter()
        images = [(s.modality, s.path) for s in scans]
        with self.lock:
            out = self.assistant.answer(question, images, max_new_tokens)
        options = None if out.probs is None else [OptionProb(option=o, prob=p)
                                                  for o, p in out.probs.items()]
        return AskResponse(question=question, answer=out.text, task=out.task, known=out.known,
                           notice=out.notice, kind=out.kind, options=options, value=out.value,
                           unit=out.unit, distribution=out.distribution,
                           scans=[s.public() for s in scans],
                           seconds=round(time.perf_counter() - start, 4))


def create_app(model_dir: str | Path, eval_dir: str | Path | None = None,
               data_roots: dict[str, str | Path] | None = None, token: str | None = None,
               max_upload_mb: float = 512.0, device: str = "cpu") -> FastAPI:
    """The ASGI app holding one loaded model. ``data_roots`` ({modality: folder}) bound the
    server-side paths clients may name; ``token`` (if set) is required on every request."""
    roots = {}
    for modality, folder in (data_roots or {}).items():
        if modality not in MODALITIES or not Path(folder).is_dir():
            raise ConfigError(f"--data-root {modality}={folder}: needs one of "
                              f"{', '.join(MODALITIES)} and an existing folder")
        roots[modality] = Path(folder).resolve()
    evaluation = EvaluationData(eval_dir) if eval_dir else None
    state = ServeState(BrainAssistant(model_dir, device), roots, evaluation,
                       int(max_upload_mb * 2**20))

    @asynccontextmanager
    async def lifespan(app):
        yield
        state.scans.close()

    app = FastAPI(title="UMBRELLA", lifespan=lifespan,
                  description="Ask a trained UMBRELLA model about brain MRI scans.")
    app.state.umbrella = state
    app.add_middleware(BodyLimit, limit=state.max_upload)

    if token:
        @app.middleware("http")
        async def require_token(request: Request, call_next):
            if not hmac.compare_digest(_token_of(request).encode(), token.encode()):
                return JSONResponse({"detail": "missing or wrong token: send it as "
                                     "'Authorization: Bearer TOKEN' or open /?token=TOKEN"}, 401)
            return await call_next(request)

    def error(status: int):
        async def handler(request: Request, exc: Exception):
            return JSONResponse({"detail": str(exc)}, status)
        return handler

    app.add_exception_handler(PathRefused, error(403))
    app.add_exception_handler(UnknownScan, error(404))
    app.add_exception_handler(UmbrellaError, error(400))
    _routes(app, state)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _nifti_response(data: bytes) -> Response:
    return Response(data, media_type="application/gzip", headers={"Cache-Control": "no-store"})


def _routes(app: FastAPI, state: ServeState) -> None:
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/api/info")
    def info() -> dict:
        return state.info()

    @app.post("/api/scans")
    def upload_scan(modality: Annotated[Modality, Form()],
                    file: Annotated[UploadFile, File()]) -> dict:
        return state.upload(modality, file).public()

    @app.post("/api/scans/path")
    def path_scan(body: ScanPath) -> dict:
        return state.by_path(body.modality, body.path).public()

    @app.get("/api/scans/{scan_id}/{which}.nii.gz")
    def scan_image(scan_id: str, which: Literal["original", "input"]):
        scan = state.scans.get(scan_id)
        with state.lock:
            return _nifti_response(view_bytes(scan, which, state.spec(scan.modality)))

    @app.get("/api/scans/{scan_id}/timecourse")
    def scan_timecourse(scan_id: str, x: int, y: int, z: int) -> dict:
        scan = state.scans.get(scan_id)
        with state.lock:
            return {"scan_id": scan_id, "voxel": [x, y, z],
                    "values": time_course(scan, (x, y, z))}

    @app.post("/api/ask")
    def ask(body: AskRequest) -> AskResponse:
        scans = [state.scans.get(s) for s in body.scans]
        scans += [state.by_path(im.modality, im.path) for im in body.images]
        return state.ask(body.question, scans, body.max_new_tokens)

    @app.post("/api/ask/upload")
    def ask_upload(question: Annotated[str, Form(min_length=1, max_length=2000)],
                   modality: Annotated[Modality, Form()], file: Annotated[UploadFile, File()],
                   max_new_tokens: Annotated[int, Form(ge=1, le=256)] = 32) -> AskResponse:
        return state.ask(question, [state.upload(modality, file)], max_new_tokens)

    def evaluation() -> EvaluationData:
        if state.evaluation is None:
            raise HTTPException(404, "no evaluation: start the server with --eval DIR")
        return state.evaluation

    @app.get("/api/eval")
    def eval_summary() -> dict:
        return evaluation().summary()

    @app.get("/api/eval/plots/{name}")
    def eval_plot(name: str):
        try:
            return FileResponse(evaluation().plot_path(name), media_type="image/png")
        except KeyError:
            raise HTTPException(404, f"no plot {name!r} in this evaluation") from None

    @app.post("/api/eval/open")
    def eval_open(body: OpenRecord) -> dict:
        images = evaluation().images.get(body.record_id)
        if images is None:
            raise HTTPException(404, f"record {body.record_id!r} has no scans on this server"
                                     + (f" ({evaluation().records_note})"
                                        if evaluation().records_note else ""))
        scans = [state.scans.add(m, p, p.name, temporary=False) for m, p in images]
        return {"record_id": body.record_id, "scans": [s.public() for s in scans]}
