"""Detection accuracy computed the slow, obvious way, to check the stage's own figures against."""

from __future__ import annotations


def voc_ap_by_hand(detections, truths, label, iou_threshold=0.5):
    """VOC 'all points' AP of one class, written out: visit detections by descending score; each is
    a hit when the truth box of its class it overlaps most (in its image) has IoU >= the threshold
    and no earlier hit took it; then sum each recall step times the best precision at that recall
    or beyond. Returns (AP, number of hits); AP is None when the class has no truth box."""
    n_gt = sum(int((t["labels"] == label).sum()) for t in truths)
    found = sorted(((float(s), i, tuple(map(float, b))) for i, d in enumerate(detections)
                    for b, s, l in zip(d.boxes, d.scores, d.labels) if l == label), key=lambda f: -f[0])
    used, hits = set(), []
    for _, i, box in found:
        best, best_iou = None, 0.0
        for j, (truth, l) in enumerate(zip(truths[i]["boxes"], truths[i]["labels"])):
            if l != label:
                continue
            w = max(0.0, min(box[2], truth[2]) - max(box[0], truth[0]))
            h = max(0.0, min(box[3], truth[3]) - max(box[1], truth[1]))
            union = ((box[2] - box[0]) * (box[3] - box[1]) + (truth[2] - truth[0]) * (truth[3] - truth[1])
                     - w * h)
            iou = w * h / union if union > 0 else 0.0
            if best is None or iou > best_iou:
                best, best_iou = j, iou
        hit = best is not None and best_iou >= iou_threshold and (i, best) not in used
        if hit:
            used.add((i, best))
        hits.append(hit)
    if n_gt == 0:
        return None, 0
    points = []  # (recall, precision) after each detection
    tp = 0
    for k, hit in enumerate(hits, 1):
        tp += hit
        points.append((tp / n_gt, tp / k))
    ap, previous_recall = 0.0, 0.0
    for k, (recall, _) in enumerate(points):
        if recall > previous_recall:
            ap += (recall - previous_recall) * max(p for _, p in points[k:])
            previous_recall = recall
    return ap, tp
