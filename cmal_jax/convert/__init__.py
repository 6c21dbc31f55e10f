"""Converters from the formats a user brings (bottom-up TSV, COCO, VG,
VQA v2, SNLI-VE, NLVR2, RefCOCO, image folders) into our records, and
`inspect`, which reads records back."""
