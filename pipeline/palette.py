"""The colours every page uses for the two labels a row can show: the label people gave it, and
the label the model predicts or suggests. One palette, so that "given" never changes colour
between the report, the review contact sheet and the mistakes gallery. Neither colour says
right or wrong (a given label can be the wrong one): blue and orange, readable by the
common colour-vision deficiencies.
"""

GIVEN = "#1f4e99"  # the dataset's label (what people gave)
MODEL = "#b34700"  # the model's label (predicted, or suggested by the review)

# CSS for the classes the pages use: .given and .model (.pred/.suggested: the same colour).
CSS = (f".given{{color:{GIVEN};font-weight:600}}"
       f".model,.pred,.suggested{{color:{MODEL};font-weight:600}}")
