"""Persistence of stored Responses and stored chat completions (`store: true`), and of
their streams' events so a stream can be resumed. Independent of the API and the engines."""

from llmserve.store.db import StoreError
from llmserve.store.paths import store_path, user_data_dir
from llmserve.store.store import Store, StoredChat, StoredResponse

__all__ = ["Store", "StoreError", "StoredChat", "StoredResponse", "store_path", "user_data_dir"]
