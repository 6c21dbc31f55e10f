"""Pictures of predictions (python -m cmal_jax.predict --draw=out.png): the
image with what the model predicted drawn on it.

The background is the image itself for a model that reads pixels (its
image store's file, decoded), scaled so its longer side is CANVAS_SIZE. A
region-store model has no pixels: the background is then a neutral grey
square with every region box (the store's normalised x1 y1 x2 y2) drawn as
a thin outline, so the boxes are the picture.

  rec    the chosen box, thick, labelled with its score; the gold box (a
         caller's, the CLI has none) in another colour.
  vqa, ve, nlvr2, retrieval
         a heat map of where the model looked: [CLS]'s attention over the
         region slots in the last unified layer (Predictor.region_attention:
         the probabilities the attention layer sows, averaged over heads,
         renormalised over the regions; no gradients, the model unchanged).
         Each region's box is filled in HEAT_COLOUR with alpha proportional
         to its weight (overlapping boxes add up), and the prediction is
         written on top. nlvr2 draws its two images side by side.
  pretrain
         the region AMC pairs with each anchor, labelled with its word
         (predict_anchors.py).

  predictor = predict.Predictor.from_workdir('runs/rec')
  got = predictor.ground(['img-1'], ['the red cube'])[0]
  draw_grounding(predictor, 'img-1', got, gold_box=[0.1, 0.2, 0.5, 0.6])
  # -> PIL.Image.Image
"""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cmal_jax.data import task_pipeline

CANVAS_SIZE = 384  # The longer side of a picture, in pixels.
GREY = (128, 128, 128)
OUTLINE_COLOUR = (230, 230, 230)  # Region boxes on the grey canvas.
CHOSEN_COLOUR = (255, 40, 40)
GOLD_COLOUR = (40, 220, 40)
HEAT_COLOUR = (255, 60, 0)
TEXT_COLOUR, TEXT_BACKGROUND = (255, 255, 255), (0, 0, 0)
CHOSEN_WIDTH = 3
MAX_HEAT_ALPHA = 0.7  # The alpha of the most attended region.


def background(record, size=CANVAS_SIZE):
  """The picture of an image record (a store's): its pixels, the longer
  side scaled to `size`; without pixels a grey size x size square."""
  pixels = record.get('image')
  if pixels is None:
    return Image.new('RGB', (size, size), GREY)
  height, width = pixels.shape[:2]
  scale = size / max(height, width)
  return Image.fromarray(pixels).convert('RGB').resize(
      (max(1, round(width * scale)), max(1, round(height * scale))),
      Image.BILINEAR)


def pixel_box(box, width, height):
  """A normalised x1 y1 x2 y2 box -> integer pixel corners on a
  width x height picture (inside it)."""
  x1, y1, x2, y2 = np.clip(np.asarray(box, np.float64), 0.0, 1.0)
  return (round(x1 * (width - 1)), round(y1 * (height - 1)),
          round(x2 * (width - 1)), round(y2 * (height - 1)))


def outline_regions(picture, record, boxes, mask):
  """Thin outlines of the real regions (boxes [R, 4], mask [R]) when the
  picture has no pixels to show (a region-store model)."""
  if record.get('image') is not None:
    return
  draw = ImageDraw.Draw(picture)
  for box in np.asarray(boxes)[np.asarray(mask) > 0]:
    draw.rectangle(pixel_box(box, *picture.size), outline=OUTLINE_COLOUR)


def label(picture, xy, text):
  """Writes text on a dark band at pixel xy (its top left), kept inside the
  picture."""
  draw = ImageDraw.Draw(picture)
  font = ImageFont.load_default()
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  x = min(max(0, xy[0]), max(0, picture.width - (right - left) - 2))
  y = min(max(0, xy[1]), max(0, picture.height - (bottom - top) - 2))
  draw.rectangle((x, y, x + right - left + 2, y + bottom + 2),
                 fill=TEXT_BACKGROUND)
  draw.text((x + 1, y), text, fill=TEXT_COLOUR, font=font)


def draw_box(picture, box, colour, text):
  """A thick box with its label above it (below its top edge when there is
  no room above): normalised box [4]."""
  corners = pixel_box(box, *picture.size)
  ImageDraw.Draw(picture).rectangle(corners, outline=colour,
                                    width=CHOSEN_WIDTH)
  above = corners[1] - 16
  label(picture, (corners[0] + CHOSEN_WIDTH + 1,
                  above if above >= 0 else corners[1] + CHOSEN_WIDTH + 1),
        text)


def heat_map(picture, boxes, weights):
  """Fills each region's box with HEAT_COLOUR at alpha proportional to its
  weight (boxes [R, 4] normalised, weights [R] >= 0; overlaps add up)."""
  width, height = picture.size
  heat = np.zeros((height, width), np.float64)
  for box, w in zip(np.asarray(boxes), np.asarray(weights, np.float64)):
    if w > 0:
      x1, y1, x2, y2 = pixel_box(box, width, height)
      heat[y1:y2 + 1, x1:x2 + 1] += w
  alpha = MAX_HEAT_ALPHA * heat / max(heat.max(), 1e-30)
  colour = np.asarray(HEAT_COLOUR, np.float64)
  out = (np.asarray(picture, np.float64) * (1 - alpha[..., None])
         + colour * alpha[..., None])
  return Image.fromarray(np.round(out).astype(np.uint8))


def side_by_side(pictures, gap=8):
  """Pictures in a row on a black strip, top-aligned."""
  width = sum(p.width for p in pictures) + gap * (len(pictures) - 1)
  row = Image.new('RGB', (width, max(p.height for p in pictures)))
  x = 0
  for p in pictures:
    row.paste(p, (x, 0))
    x += p.width + gap
  return row


# ------------------------------------------------------------ per task

def draw_grounding(predictor, image_id, grounded, gold_box=None):
  """REC: the image (an id, or a file: Predictor.image_record) with the
  chosen region (`grounded`, one of Predictor.ground's results) thick in
  CHOSEN_COLOUR, labelled with its score, and gold_box (normalised x1 y1
  x2 y2) in GOLD_COLOUR if given."""
  record = predictor.image_record(image_id)
  picture = background(record)
  if record.get('image') is None:
    # The regions the model scored: the encoded (padded, kept) ones.
    arrays, _ = task_pipeline.encode_regions(record, predictor.shapes)
    outline_regions(picture, record, arrays['region_boxes'],
                    arrays['region_mask'])
  if gold_box is not None:
    draw_box(picture, gold_box, GOLD_COLOUR, 'gold')
  draw_box(picture, grounded['box'], CHOSEN_COLOUR,
           f'region {grounded["region"]}: {grounded["score"]:.3f}')
  return picture


def draw_attention(predictor, text, image_ids, caption):
  """The heat map of [CLS]'s attention over the regions of each of the
  query's images (one for vqa, ve and retrieval; nlvr2's two side by side),
  with `caption` (the prediction) written on top."""
  (attended,) = predictor.region_attention([text], [list(image_ids)])
  pictures = []
  for image_id, (weights, boxes, mask) in zip(image_ids, attended):
    record = predictor.image_record(image_id)
    picture = background(record)
    outline_regions(picture, record, boxes, mask)
    pictures.append(heat_map(picture, boxes, weights))
  picture = side_by_side(pictures)
  label(picture, (0, 0), caption)
  return picture


def draw_prediction(predictor, query, image_ids, result):
  """The picture of one CLI prediction: `result` is what predict.predict
  returned for the query text and its image ids (retrieval: the ranked
  images; its best is drawn)."""
  task = predictor.task
  if task == 'rec':
    return draw_grounding(predictor, image_ids[0], result)
  if task == 'vqa':
    caption = f'{result[0]["answer"]} ({result[0]["score"]:.3f})'
  elif task == 've':
    best = max(result, key=result.get)
    caption = f'{best} ({result[best]:.3f})'
  elif task == 'nlvr2':
    caption = f'{result > 0.5} (p_true {result:.3f})'
  else:
    image_ids = [result[0]['image']]
    caption = f'{image_ids[0]} ({result[0]["score"]:.3f})'
  return draw_attention(predictor, query, image_ids, caption)


def draw_anchors(pair, found):
  """A pre-training pair (AnchorFinder.pair) with its regions outlined and
  the region AMC pairs with each anchor (AnchorFinder.anchors' `found`)
  labelled with the anchor's word."""
  picture = background(pair)
  boxes = pair['region_boxes']
  outline_regions(picture, pair, boxes, np.ones(len(boxes)))
  for anchor in found:
    draw_box(picture, anchor['box'], CHOSEN_COLOUR, anchor['word'])
  return picture
