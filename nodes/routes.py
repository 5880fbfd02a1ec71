"""HTTP routes and events of the training jobs (ComfyUI mirrors every route under /api too).

GET  /zit/jobs                         {"jobs": [snapshot, ...]}
GET  /zit/jobs/{id}                    {"job": snapshot, "loss": [[step, loss]], "lr": [[step, lr]],
                                        "health": [[step, turbo health]],
                                        "previews": [{"step", "name", "url"}], "checkpoints": [file name]}
POST /zit/jobs/{id}/stop               {"ok": true, "job": snapshot}; 409 when it has already finished
POST /zit/jobs/{id}/resume             body {} or {"checkpoint": one of its checkpoints} -> {"job": snapshot}
                                       of a new job continuing the run; 409 while it runs, 400 bad name
GET  /zit/jobs/{id}/previews/{name}    image/png; 404 unless name is one of the job's previews

A snapshot is trainer.job.Job.snapshot() in public form (nodes.jobs.snapshot) plus "lora_name" and
"resumable". Errors are {"error": message} with 400, 404 or 409. Only job ids and the names the routes
themselves list come from the client; a file is only ever opened from a name found in a listing.

Events: every job event goes out as PromptServer.instance.send_sync("zit.<kind>", {"job": id, ...}) for
kinds progress, preview (with "url"), status, log, checkpoint (file and loras names), cache.

Registering imports nothing heavy: the handlers use aiohttp (already loaded by ComfyUI's server) and
nodes.jobs (which imports trainer.job only).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from . import jobs

PREFIX = jobs.ROUTE


def _json(data: dict[str, Any], status: int = 200) -> Any:
    from aiohttp import web

    return web.json_response(data, status=status)


def _error(exc: jobs.JobError) -> Any:
    return _json({"error": str(exc)}, exc.status)


async def list_jobs(request: Any) -> Any:
    """Every training job of this session, oldest first."""
    return _json({"jobs": [jobs.snapshot(job, record) for job, record in jobs.jobs()]})


async def job_details(request: Any) -> Any:
    try:
        job, record = jobs.get(request.match_info["id"])
    except jobs.JobError as exc:
        return _error(exc)
    return _json(jobs.details(job, record))


async def stop_job(request: Any) -> Any:
    try:
        job = jobs.stop(request.match_info["id"])
    except jobs.JobError as exc:
        return _error(exc)
    return _json({"ok": True, "job": jobs.snapshot(*jobs.get(job.id))})


async def _body(request: Any) -> dict[str, Any]:
    """The JSON object in the body ({} when empty); JobError 400 for anything else."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise jobs.JobError(400, 'the body is not JSON: send {} or {"checkpoint": "<name>"}') from None
    if not isinstance(body, dict):
        raise jobs.JobError(400, 'the body must be a JSON object: {} or {"checkpoint": "<name>"}')
    return body


async def resume_job(request: Any) -> Any:
    try:
        job_id = request.match_info["id"]
        jobs.get(job_id)  # 404 before reading the body
        body = await _body(request)
        unknown = sorted(set(body) - {"checkpoint"})
        if unknown:
            raise jobs.JobError(400, f"unknown field(s) {', '.join(unknown)}: the body takes only "
                                     "'checkpoint'")
        checkpoint = body.get("checkpoint")
        if checkpoint is not None and not isinstance(checkpoint, str):
            raise jobs.JobError(400, "'checkpoint' must be a checkpoint file name, got "
                                     f"{type(checkpoint).__name__}")
        new = jobs.resume(job_id, checkpoint)
    except jobs.JobError as exc:
        return _error(exc)
    return _json({"job": jobs.snapshot(*jobs.get(new.id))})


async def preview_image(request: Any) -> Any:
    from aiohttp import web

    try:
        path = jobs.preview_file(request.match_info["id"], request.match_info["name"])
    except jobs.JobError as exc:
        return _error(exc)
    return web.FileResponse(path, headers={"Content-Type": "image/png", "Cache-Control": "no-cache"})


def _forward(instance: Any) -> Any:
    def send(event: Any) -> None:
        instance.send_sync(f"zit.{event.kind}", jobs.public_event(event))

    return send


def register_routes() -> bool:
    """Add the routes and the event forwarding to ComfyUI's running server; False (nothing added) where there
    is none, e.g. when the pack is imported by a script or a test without a PromptServer."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    routes = instance.routes
    routes.get(PREFIX)(list_jobs)
    routes.get(PREFIX + "/{id}")(job_details)
    routes.post(PREFIX + "/{id}/stop")(stop_job)
    routes.post(PREFIX + "/{id}/resume")(resume_job)
    routes.get(PREFIX + "/{id}/previews/{name}")(preview_image)
    jobs.RUNNER.subscribe(_forward(instance))
    return True
