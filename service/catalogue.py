"""The served model's catalogue as the API lists it: item ids in row order with their training popularity."""

from __future__ import annotations

from hytrec.model.vocab import Vocab
from hytrec.service.schemas import CatalogueItem, ItemPage


class Catalogue:
    """Pages over one vocabulary (immutable while the model is served)."""

    def __init__(self, vocab: Vocab) -> None:
        self.ids = vocab.ids
        self.popularity = vocab.popularity.tolist()

    def page(self, offset: int, limit: int) -> ItemPage:
        end = min(offset + limit, len(self.ids))
        items = [CatalogueItem(item_id=self.ids[i], popularity=self.popularity[i]) for i in range(offset, end)]
        return ItemPage(
            items=items, total=len(self.ids), offset=offset, next_offset=end if end < len(self.ids) else None
        )
