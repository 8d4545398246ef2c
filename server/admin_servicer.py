"""loraplex.v1.AdapterAdmin: uploads go to the AdapterStore (disk, under the adapter
root), registration goes to the engine's adapter manager. Authentication happens before
any of this (auth.py); status codes come from status.py.

Upload order: the header is checked first (id, and ALREADY_EXISTS before any chunk is
read), chunks stream to a staging directory (a cancelled or failed upload removes it),
the store validates it (converting it: before it replaces anything on disk) and
atomically moves it into place, then the adapter manager registers the converted weights.
Validation and conversion run in this RPC's thread, not in the engine's step loop, so
other requests keep flowing.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from loraplex.adapters.errors import AdapterExists
from loraplex.adapters.store import validate_id
from loraplex.server import convert
from loraplex.server.engine.errors import InvalidRequest
from loraplex.server.metrics import ServerMetrics
from loraplex.server.status import abort_for
from loraplex.v1 import admin_pb2, admin_pb2_grpc

MAX_PAGE_SIZE = 1000  # adapters per ListAdapters page (and the default)

CONFIG_FILENAME = "adapter_config.json"


class AdapterAdminServicer(admin_pb2_grpc.AdapterAdminServicer):
    def __init__(self, engine, store, metrics: ServerMetrics):
        self._engine = engine
        self._store = store
        self._metrics = metrics

    def UploadAdapter(self, request_iterator, context):
        writer = None
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("part") != "header":
                raise InvalidRequest("the first UploadAdapter message must be a header")
            header = first.header
            if not header.replace and header.adapter_id in self._engine.adapters:
                raise AdapterExists(f"adapter {header.adapter_id!r} already exists")
            writer = self._store.begin_upload(header.adapter_id)  # validates the id
            if header.HasField("config_json"):
                writer.write(CONFIG_FILENAME, header.config_json.encode())
            for message in request_iterator:
                if message.WhichOneof("part") != "chunk":
                    raise InvalidRequest("only the first UploadAdapter message may be a header")
                if header.HasField("config_json") and message.chunk.filename == CONFIG_FILENAME:
                    raise InvalidRequest(f"{CONFIG_FILENAME} came in the header and again as a chunk")
                writer.write(message.chunk.filename, message.chunk.data)
            if not context.is_active():  # the client cancelled after its last chunk: keep nothing
                context.abort(grpc.StatusCode.CANCELLED, "the client cancelled the upload")
            converted = []  # the validation's result, registered as it is
            path = writer.commit(lambda d: converted.append(self._engine.adapters.convert(d)), replace=header.replace)
            writer = None
            try:
                info = self._engine.adapters.add(header.adapter_id, path, replace=header.replace, weights=converted[0])
            except Exception:
                if not header.replace:  # stored but not registered: do not leave it behind
                    self._store.delete(header.adapter_id)
                raise
            return convert.adapter_info_to_pb(info)
        except Exception as e:  # noqa: BLE001
            if writer is not None:
                writer.abort()
            abort_for(context, e)

    def LoadAdapter(self, request, context):
        try:
            validate_id(request.adapter_id)
            path = self._store.resolve_load_path(request.path)
            info = self._engine.adapters.add(request.adapter_id, path, replace=request.replace)
            return convert.adapter_info_to_pb(info)
        except Exception as e:  # noqa: BLE001
            abort_for(context, e)

    def UnloadAdapter(self, request, context):
        try:
            info = self._engine.adapters.get(request.adapter_id)
            if request.delete_files and Path(info.path).resolve() != self._store.path(request.adapter_id):
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"adapter {request.adapter_id!r} was loaded from {info.path}, not stored by an upload; "
                    "unload it without delete_files",
                )
            self._engine.adapters.remove(request.adapter_id)
            self._metrics.forget_adapter(request.adapter_id)
            if request.delete_files:
                self._store.delete(request.adapter_id)
            return admin_pb2.UnloadAdapterResponse()
        except Exception as e:  # noqa: BLE001
            abort_for(context, e)

    def ListAdapters(self, request, context):
        if request.page_size > MAX_PAGE_SIZE:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"page_size {request.page_size} is over the limit {MAX_PAGE_SIZE}")
        infos, next_token = self._engine.adapters.list_page(request.page_token, request.page_size or MAX_PAGE_SIZE)
        return admin_pb2.ListAdaptersResponse(adapters=[convert.adapter_info_to_pb(i) for i in infos], next_page_token=next_token)

    def GetAdapter(self, request, context):
        try:
            return convert.adapter_info_to_pb(self._engine.adapters.get(request.adapter_id))
        except Exception as e:  # noqa: BLE001
            abort_for(context, e)
