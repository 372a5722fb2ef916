"""Errors as the OpenAI API returns them: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx
status, ``param`` naming the offending field, so that clients (the ``openai`` package among them) raise
their usual exception types and the user sees what to fix."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(error.status, error.message, error.param, error.code), error.status)


def _validation_response(request: Request, error: RequestValidationError) -> JSONResponse:
    """pydantic's first complaint, as ``"`max_tokens`: Input should be greater than or equal to 1"``."""
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return error_response(
            ApiError(400, f"the body is not valid JSON: {first.get('msg')}", code="json_invalid")
        )
    param = ".".join(location) or None
    shown = f"`{param}`: " if param else ""
    value = (
        f" (got {first['input']!r})"
        if "input" in first and param and not isinstance(first["input"], dict)
        else ""
    )
    message = f"{shown}{first.get('msg', 'invalid value')}{value}"
    return error_response(ApiError(400, message, param=param, code=first.get("type")))


def install(app: FastAPI) -> None:
    """Every error the app raises gets the OpenAI body."""

    @app.exception_handler(ApiError)
    async def _api(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_response(request, error)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(error.status_code, str(error.detail)))
