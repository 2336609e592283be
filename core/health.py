"""Liveness and database reachability."""

from __future__ import annotations

from flask import Blueprint, jsonify
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from core.database import db

blueprint = Blueprint("health", __name__)


@blueprint.get("/healthz")
def healthz():
    """Answer 200 when the database answers, 503 when it does not."""
    try:
        _select_one()
    except SQLAlchemyError:
        db.session.rollback()
        return jsonify(status="unavailable", database="unreachable"), 503
    return jsonify(status="ok", database="ok")


def _select_one() -> None:
    try:
        db.session.execute(text("SELECT 1"))
    except DBAPIError as error:
        if not error.connection_invalidated:
            raise
        # The pool does not ping busy connections (core.database), so this one may have been dropped by a
        # database restart since its last use; that says nothing about the database now: ask a fresh one.
        db.session.rollback()
        db.session.execute(text("SELECT 1"))
