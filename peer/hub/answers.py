"""Hub answers over aiohttp, for both servers of the Hub protocol: the agent's Hub API
(`peer.serving.hub_api`) and the project's mirror (`peer.mirror_server`)."""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web


def hub_error(
    status: int, code: str | None, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """An error the way the Hub sends it: huggingface_hub keys on X-Error-Code."""
    # Headers are latin-1 on the wire; a path in the message may not be.
    header_safe = message.encode("ascii", "backslashreplace").decode("ascii")
    h = {"X-Error-Message": header_safe, **(headers or {})}
    if code is not None:
        h["X-Error-Code"] = code
    return web.json_response({"error": message}, status=status, headers=h)


def range_not_satisfiable(size: int, headers: Mapping[str, str]) -> web.Response:
    """416 for a Range past the end of a `size`-byte body."""
    return hub_error(
        416, None, "range not satisfiable", {**headers, "Content-Range": f"bytes */{size}"}
    )


def entry_not_found(path: str, revision: str, commit: str) -> web.Response:
    """404 for a path a revision does not hold (a file, or a folder of a tree listing)."""
    return hub_error(
        404, "EntryNotFound", f"{path} does not exist on {revision!r}", {"X-Repo-Commit": commit}
    )


async def paths_asked(request: web.BaseRequest) -> list[str] | web.Response:
    """The paths of a paths-info POST (form fields ``paths``, or JSON ``{paths: [...]}``),
    else the 400 to answer."""
    try:
        if request.content_type == "application/json":
            body = await request.json()
            return [str(p) for p in body.get("paths", [])]
        return [str(p) for p in (await request.post()).getall("paths", [])]
    except (ValueError, AttributeError):
        return hub_error(400, None, "paths-info takes form field(s) `paths` or JSON {paths: [...]}")
