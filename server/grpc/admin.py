"""loraplex.v1.AdapterAdmin: protobuf in, the service's adapter operations (service.py:
the checks, the store commit, the registration and the rollback), protobuf out.
Authentication happens before any of this (auth.py); status codes come from status.py.

What stays here is the wire protocol of UploadAdapter: the header comes first (its id,
and ALREADY_EXISTS, are checked before any chunk is read), chunks stream into the
service's upload (a cancelled or failed upload keeps nothing), and a config sent in the
header must not come again as a chunk. Validation and conversion run in this RPC's
thread, not in the engine's step loop, so other requests keep flowing.
"""

from __future__ import annotations

import grpc

from loraplex.server.engine.errors import InvalidRequest
from loraplex.server.grpc import convert
from loraplex.server.grpc.status import abort_for
from loraplex.server.service import CONFIG_FILENAME, Service
from loraplex.v1 import admin_pb2, admin_pb2_grpc


class AdapterAdminServicer(admin_pb2_grpc.AdapterAdminServicer):
    def __init__(self, service: Service):
        self._service = service

    def UploadAdapter(self, request_iterator, context):
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("part") != "header":
                raise InvalidRequest("the first UploadAdapter message must be a header")
            header = first.header
            with self._service.begin_upload(header.adapter_id, replace=header.replace) as upload:
                if header.HasField("config_json"):
                    upload.write(CONFIG_FILENAME, header.config_json.encode())
                for message in request_iterator:
                    if message.WhichOneof("part") != "chunk":
                        raise InvalidRequest("only the first UploadAdapter message may be a header")
                    if header.HasField("config_json") and message.chunk.filename == CONFIG_FILENAME:
                        raise InvalidRequest(f"{CONFIG_FILENAME} came in the header and again as a chunk")
                    upload.write(message.chunk.filename, message.chunk.data)
                if not context.is_active():  # the client cancelled after its last chunk: keep nothing
                    upload.abort()
                    context.abort(grpc.StatusCode.CANCELLED, "the client cancelled the upload")
                info = upload.commit()
            return convert.adapter_info_to_pb(info)
        except Exception as e:  # noqa: BLE001
            abort_for(context, e)

    def LoadAdapter(self, request, context):
        try:
            return convert.adapter_info_to_pb(self._service.load(request.adapter_id, request.path, replace=request.replace))
        except Exception as e:  # noqa: BLE001
            abort_for(context, e)

    def UnloadAdapter(self, request, context):
        try:
            self._service.unload(request.adapter_id, delete_files=request.delete_files)
            return admin_pb2.UnloadAdapterResponse()
        except Exception as e:  # noqa: BLE001
            abort_for(context, e)

    def ListAdapters(self, request, context):
        try:
            infos, next_token = self._service.list_page(request.page_token, request.page_size)
        except Exception as e:  # noqa: BLE001
            abort_for(context, e)
        return admin_pb2.ListAdaptersResponse(adapters=[convert.adapter_info_to_pb(i) for i in infos], next_page_token=next_token)

    def GetAdapter(self, request, context):
        try:
            return convert.adapter_info_to_pb(self._service.get(request.adapter_id))
        except Exception as e:  # noqa: BLE001
            abort_for(context, e)
