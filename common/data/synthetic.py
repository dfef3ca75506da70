"""A seeded, synthetic MIMIC-IV-style ICU cohort split into hospitals.

The default simulation needs data where the right merge matters: mortality here depends on two
kinds of evidence a model may or may not know how to read, physiology (vitals and labs against
reference ranges, the numeric sections) and clinical context (diagnoses and treatments). Sites
differ in size, case mix and baseline severity, as real hospitals do, so pooled metrics are not
the same as any one site's.

The text follows the MIMIC-IV text encoding (diagnoses sentence, chart events
`<mean> for <label>`, medications `<amount> of <label>`, procedures, outputs), with values
rounded to clinical precision rather than three decimals: digits are one token each, and short
texts keep CPU scoring fast. Every draw comes from a generator keyed by a domain tag, so the
public fine-tuning corpora (`simulation.corpora`) never share a random stream with a cohort.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.errors import FedmergeError
from common.records import PatientRecord, Section

# Domain tag mixed into every cohort seed; the corpora use other tags.
COHORT_STREAM = 0xC0407
DEFAULT_SEED = 2025
DEFAULT_SITES = 3


@dataclass(frozen=True)
class Measure:
    """A vital or lab: its MIMIC label, healthy distribution, reference range and precision."""

    label: str
    mean: float
    sd: float
    low: float
    high: float
    decimals: int
    # How far physiological derangement pushes it, in units of the range width, and which way.
    push: float
    direction: int
    floor: float
    ceil: float


VITALS: tuple[Measure, ...] = (
    Measure("Heart Rate", 80, 9, 60, 100, 0, 1.3, +1, 30, 190),
    Measure("Arterial Blood Pressure mean", 84, 8, 70, 105, 0, 0.9, -1, 35, 140),
    Measure("Respiratory Rate", 16, 2.2, 12, 20, 0, 1.6, +1, 5, 45),
    Measure("Temperature Fahrenheit", 98.4, 0.6, 97.0, 99.9, 1, 0.9, +1, 93, 106),
    Measure("O2 saturation pulseoxymetry", 97.5, 1.2, 94, 100, 0, 1.7, -1, 70, 100),
)
LABS: tuple[Measure, ...] = (
    Measure("Creatinine", 0.9, 0.2, 0.6, 1.2, 1, 3.0, +1, 0.3, 12),
    Measure("Lactate", 1.2, 0.35, 0.5, 2.0, 1, 3.2, +1, 0.3, 20),
    Measure("Sodium", 139, 2.2, 135, 145, 0, 0.9, -1, 115, 165),
    Measure("Potassium", 4.1, 0.3, 3.5, 5.0, 1, 1.2, +1, 2.2, 7.5),
    Measure("WBC", 8.0, 1.8, 4.0, 11.0, 1, 1.6, +1, 0.5, 60),
    Measure("Total Bilirubin", 0.6, 0.2, 0.1, 1.2, 1, 3.0, +1, 0.1, 30),
    Measure("Platelet Count", 250, 45, 150, 400, 0, 0.6, -1, 8, 800),
)
LAB_MEASURED_P = 0.6

# Primary conditions by category: (name, severity weight); the weight drives both which
# diagnosis a severe stay gets and the clinical score.
CONDITIONS: dict[str, tuple[tuple[str, float], ...]] = {
    "sepsis": (("Sepsis", 1.0), ("Septic shock", 2.2), ("Severe sepsis", 1.6)),
    "cardiac": (
        ("Acute myocardial infarction", 1.2),
        ("Cardiogenic shock", 2.4),
        ("Congestive heart failure", 0.6),
        ("Cardiac arrest", 2.8),
    ),
    "respiratory": (
        ("Pneumonia", 0.7),
        ("Acute respiratory failure", 1.5),
        ("Acute respiratory distress syndrome", 2.0),
        ("Chronic obstructive pulmonary disease exacerbation", 0.5),
    ),
    "neuro": (
        ("Intracerebral hemorrhage", 2.0),
        ("Acute ischemic stroke", 1.0),
        ("Status epilepticus", 0.9),
        ("Subarachnoid hemorrhage", 1.6),
    ),
    "gi": (
        ("Gastrointestinal hemorrhage", 0.9),
        ("Acute pancreatitis", 1.0),
        ("Alcoholic cirrhosis of liver", 1.3),
        ("Hepatic failure", 2.1),
    ),
    "surgical": (
        ("Coronary artery bypass graft", -0.6),
        ("Elective spinal fusion", -1.0),
        ("Aortic valve replacement", -0.5),
        ("Hip fracture repair", -0.2),
    ),
    "metabolic": (
        ("Diabetic ketoacidosis", -0.3),
        ("Drug overdose", -0.4),
        ("Hyponatremia", 0.1),
        ("Alcohol withdrawal", -0.3),
    ),
}
CATEGORY_MIX = {  # typical adult ICU mix; each site perturbs it
    "sepsis": 0.18,
    "cardiac": 0.18,
    "respiratory": 0.16,
    "neuro": 0.12,
    "gi": 0.10,
    "surgical": 0.16,
    "metabolic": 0.10,
}
COMORBIDITIES: tuple[tuple[str, float], ...] = (
    ("Essential hypertension", 0.0),
    ("Hyperlipidemia", 0.0),
    ("Type 2 diabetes mellitus", 0.1),
    ("Atrial fibrillation", 0.3),
    ("Chronic kidney disease", 0.4),
    ("Acute kidney failure", 0.9),
    ("Chronic obstructive pulmonary disease", 0.3),
    ("Malignant neoplasm", 1.1),
    ("Obesity", 0.0),
    ("Anemia", 0.2),
    ("Coagulopathy", 0.8),
    ("Depression", 0.0),
)

# Medications: (label, severity weight, typical mean amount, decimals shown). Vasopressors
# weigh most: a team gives them to the sickest patients.
MEDICATIONS: tuple[tuple[str, float, float, int], ...] = (
    ("Norepinephrine", 1.3, 0.12, 2),
    ("Vasopressin", 1.5, 2.4, 1),
    ("Epinephrine", 1.6, 0.05, 2),
    ("Propofol", 0.6, 30, 0),
    ("Fentanyl Citrate", 0.4, 75, 0),
    ("Midazolam", 0.5, 3, 0),
    ("Vancomycin", 0.4, 1000, 0),
    ("Piperacillin", 0.4, 4, 1),
    ("Insulin", 0.1, 6, 0),
    ("Heparin Sodium", 0.1, 900, 0),
    ("Furosemide", 0.2, 40, 0),
    ("Pantoprazole", 0.0, 40, 0),
    ("Acetaminophen", -0.2, 650, 0),
    ("Ondansetron", -0.3, 4, 0),
)
PROCEDURES: tuple[tuple[str, float], ...] = (
    ("Invasive Ventilation", 1.2),
    ("Dialysis - CRRT", 1.4),
    ("Arterial Line", 0.3),
    ("Multi Lumen", 0.2),
    ("Chest X-Ray", 0.0),
    ("EKG", -0.1),
    ("Transthoracic Echo", 0.0),
)
OUTPUTS = ("Foley", "Void", "Chest Tube", "Nasogastric", "Stool", "Drain")


@dataclass(frozen=True)
class SiteProfile:
    """What makes one hospital different: its size, case mix, severity and age of patients."""

    site_id: str
    stays: int
    mix: dict[str, float]
    severity_shift: float
    intercept_shift: float
    age_mean: float


@dataclass
class Stay:
    """One synthetic stay before rendering; the scores are what the severity model reads."""

    age: int
    gender: str
    category: str
    diagnoses: list[tuple[str, float]]
    chart: list[tuple[Measure, float]]
    medications: list[tuple[str, float, float, int]]
    procedures: list[tuple[str, float]]
    outputs: list[str]
    physiology: float = 0.0  # derangement read from the rendered values
    clinical: float = 0.0  # severity read from diagnoses and treatments


def stream(tag: int, *keys: int) -> np.random.Generator:
    """A generator for one purpose: the tag keeps cohorts and corpora on disjoint streams."""
    return np.random.default_rng([tag, *keys])


def _fmt(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def derangement(measure: Measure, value: float) -> float:
    """Distance outside the reference range, in range widths (0 inside the range)."""
    width = measure.high - measure.low
    if value > measure.high:
        return (value - measure.high) / width
    if value < measure.low:
        return (measure.low - value) / width
    return 0.0


def physiology_score(chart: list[tuple[Measure, float]]) -> float:
    """Sum of the square-root derangements (capped), so one wild value does not dominate."""
    return float(sum(math.sqrt(min(derangement(m, v), 4.0)) for m, v in chart))


def clinical_score(stay: Stay) -> float:
    """Severity of the diagnoses and of the treatments a team chose."""
    dx = sum(w for _, w in stay.diagnoses)
    meds = sum(w for _, w, _, _ in stay.medications)
    procs = sum(w for _, w in stay.procedures)
    return float(dx + 0.6 * meds + 0.8 * procs)


def _pick_weighted(rng: np.random.Generator, items, weights) -> int:
    w = np.asarray(weights, dtype=float)
    return int(rng.choice(len(items), p=w / w.sum()))


def sample_stay(
    rng: np.random.Generator,
    *,
    mix: dict[str, float] | None = None,
    physiology: float | None = None,
    clinical: float | None = None,
    age_mean: float = 64.0,
) -> Stay:
    """Draw one stay whose numbers follow latent physiological severity and whose
    diagnoses/treatments follow latent clinical severity (both ~N(0, 1) by default)."""
    mix = mix or CATEGORY_MIX
    p = rng.normal() if physiology is None else physiology
    q = rng.normal() if clinical is None else clinical
    cats = list(mix)
    category = cats[_pick_weighted(rng, cats, [mix[c] for c in cats])]
    age = int(np.clip(rng.normal(age_mean, 15), 18, 95))
    gender = "male" if rng.random() < 0.56 else "female"

    # Diagnoses: the primary condition's severity tracks q, comorbidities are mostly chronic.
    options = CONDITIONS[category]
    ws = [math.exp(1.3 * q * w) for _, w in options]
    diagnoses = [options[_pick_weighted(rng, options, ws)]]
    n_comorb = int(rng.integers(0, 3))
    cw = [math.exp(1.0 * q * w) for _, w in COMORBIDITIES]
    for idx in rng.choice(
        len(COMORBIDITIES), size=n_comorb, replace=False, p=np.divide(cw, sum(cw))
    ):
        diagnoses.append(COMORBIDITIES[int(idx)])

    # Chart events: healthy draw, pushed outside the range by physiological derangement.
    chart: list[tuple[Measure, float]] = []
    measures = list(VITALS) + [m for m in LABS if rng.random() < LAB_MEASURED_P]
    for m in measures:
        value = rng.normal(m.mean, m.sd)
        load = max(0.0, p + 0.7 * rng.normal() - 0.2)
        value += m.direction * m.push * (m.high - m.low) * load**1.5 * 0.5
        value = float(np.clip(value, m.floor, m.ceil))
        chart.append((m, round(value, m.decimals)))

    # Treatments: probability of each grows with its severity weight times q.
    medications = []
    for med in MEDICATIONS:
        _, w, amount, decimals = med
        logit = -1.6 + 1.5 * q * w + (0.4 if w <= 0.2 else -0.6)
        if rng.random() < 1 / (1 + math.exp(-logit)):
            medications.append(
                (med[0], w, round(amount * math.exp(0.35 * rng.normal()), decimals), decimals)
            )
    medications = medications[:4]
    procedures = []
    for proc in PROCEDURES:
        logit = -1.4 + 1.6 * q * proc[1] + (0.3 if proc[1] <= 0.3 else -0.9)
        if rng.random() < 1 / (1 + math.exp(-logit)):
            procedures.append(proc)
    procedures = procedures[:3]
    outputs = [
        OUTPUTS[int(i)]
        for i in rng.choice(len(OUTPUTS), size=int(rng.integers(1, 3)), replace=False)
    ]
    stay = Stay(age, gender, category, diagnoses, chart, medications, procedures, outputs)
    stay.physiology = physiology_score(chart)
    stay.clinical = clinical_score(stay)
    return stay


MEDS_HEADER = "The mean amounts of medications administered during the episode are :"


def render_sections(stay: Stay) -> tuple[Section, ...]:
    """The MIMIC-IV text encoding; chart events and medications are the numeric sections."""
    dx = ";".join(name for name, _ in stay.diagnoses)
    sections = [
        Section(
            name="diagnoses",
            text=f"The patient {stay.gender} , {stay.age} years old , is diagnosed with {dx}.",
        ),
        Section(
            name="chart_events",
            text="The chart events mesured are : "
            + ";".join(f"{_fmt(v, m.decimals)} for {m.label}" for m, v in stay.chart)
            + ".",
            numeric=True,
        ),
    ]
    if stay.medications:
        meds = ";".join(f"{_fmt(a, d)} of {name}" for name, _, a, d in stay.medications)
        sections.append(
            Section(
                name="medications",
                text=f"{MEDS_HEADER} {meds}.",
                numeric=True,
            )
        )
    if stay.procedures:
        procs = ";".join(name for name, _ in stay.procedures)
        sections.append(Section(name="procedures", text=f"The procedures performed are : {procs}."))
    sections.append(
        Section(name="outputs", text=f"The outputs collected are : {';'.join(stay.outputs)}.")
    )
    return tuple(sections)


def render_text(sections: tuple[Section, ...]) -> str:
    return " ".join(s.text for s in sections)


# Severity model: mortality logit from what the text shows plus an unobserved part. The
# constants centre and scale the scores of the default mix (physiology: median 0.5, mean 1.7,
# sd 2.7, zero for a quarter of stays; clinical: mean 2.5, sd 2.1) so that each kind of
# evidence alone ranks stays at AUROC ~0.78 and both together at ~0.87.
PHYS_CENTRE, PHYS_SCALE = 1.7, 2.7
CLIN_CENTRE, CLIN_SCALE = 2.5, 2.1
BETA_PHYS, BETA_CLIN, BETA_AGE = 1.1, 1.1, 0.02
BASE_INTERCEPT = -2.6
UNOBSERVED_SD = 0.6


def mortality_logit(stay: Stay, intercept_shift: float = 0.0) -> float:
    """The observable part of the log-odds of death."""
    z_phys = (stay.physiology - PHYS_CENTRE) / PHYS_SCALE
    z_clin = (stay.clinical - CLIN_CENTRE) / CLIN_SCALE
    return (
        BASE_INTERCEPT
        + intercept_shift
        + BETA_PHYS * z_phys
        + BETA_CLIN * z_clin
        + BETA_AGE * (stay.age - 64)
    )


def site_profiles(n_sites: int, seed: int, stays_per_site: list[int] | None) -> list[SiteProfile]:
    """Per-site heterogeneity, seeded: size, case mix (Dirichlet around the typical mix),
    baseline severity and age."""
    rng = stream(COHORT_STREAM, seed, 10_000)
    cats = list(CATEGORY_MIX)
    base = np.array([CATEGORY_MIX[c] for c in cats])
    profiles = []
    for i in range(n_sites):
        size = int(stays_per_site[i]) if stays_per_site is not None else int(rng.integers(200, 301))
        mix = rng.dirichlet(base * 12.0)
        profiles.append(
            SiteProfile(
                site_id=f"site-{i}",
                stays=size,
                mix={c: float(m) for c, m in zip(cats, mix, strict=True)},
                severity_shift=float(rng.normal(0.0, 0.35)),
                intercept_shift=float(rng.normal(0.0, 0.5)),
                age_mean=float(rng.uniform(58, 70)),
            )
        )
    return profiles


def generate_cohort(
    n_sites: int = DEFAULT_SITES,
    *,
    seed: int = DEFAULT_SEED,
    stays_per_site: list[int] | None = None,
) -> list[PatientRecord]:
    """The synthetic cohort: `n_sites` hospitals `site-0`, `site-1`, ... with unique stay ids."""
    if n_sites < 1:
        raise FedmergeError(f"synthetic cohort: sites={n_sites}, expected an integer >= 1")
    if stays_per_site is not None:
        if len(stays_per_site) != n_sites:
            raise FedmergeError(
                f"synthetic cohort: stays has {len(stays_per_site)} values, expected one per "
                f"site ({n_sites})"
            )
        if any(int(s) < 1 for s in stays_per_site):
            raise FedmergeError(f"synthetic cohort: stays={stays_per_site}, expected sizes >= 1")
    records: list[PatientRecord] = []
    for i, site in enumerate(site_profiles(n_sites, seed, stays_per_site)):
        rng = stream(COHORT_STREAM, seed, i)
        for j in range(site.stays):
            latent = rng.normal() + site.severity_shift
            # Physiology and clinical context share part of their cause (r ~ 0.4).
            p = 0.65 * latent + 0.76 * rng.normal()
            q = 0.65 * latent + 0.76 * rng.normal()
            stay = sample_stay(rng, mix=site.mix, physiology=p, clinical=q, age_mean=site.age_mean)
            logit = mortality_logit(stay, site.intercept_shift) + UNOBSERVED_SD * rng.normal()
            prob = 1 / (1 + math.exp(-logit))
            label = int(rng.random() < prob)
            sections = render_sections(stay)
            records.append(
                PatientRecord(
                    stay_id=f"{site.site_id}-{j:05d}",
                    site_id=site.site_id,
                    label=label,
                    text=render_text(sections),
                    sections=sections,
                )
            )
    return records


def _parse_int(spec: str, key: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise FedmergeError(
            f"data spec 'synthetic:{spec}': field '{key}' is {raw!r}, expected an integer"
        ) from None


def load_synthetic(args: str) -> list[PatientRecord]:
    """Parse the text after `synthetic:` (`sites=N,seed=S,stays=A/B/C` or `stays=N`; every key
    optional, empty = the default cohort) and generate the cohort. `site=I` (or `site=site-I`)
    keeps one hospital's stays: what a rehearsal node's file names, so that every node
    generates the same cohort and scores only its own share."""
    n_sites, seed, stays_raw, site = DEFAULT_SITES, DEFAULT_SEED, None, None
    for part in filter(None, (p.strip() for p in args.split(","))):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise FedmergeError(
                f"data spec 'synthetic:{args}': '{part}' is not key=value "
                "(expected sites=N, seed=S or stays=A/B/C)"
            )
        if key == "sites":
            n_sites = _parse_int(args, key, value)
        elif key == "seed":
            seed = _parse_int(args, key, value)
        elif key == "stays":
            stays_raw = [_parse_int(args, key, v) for v in value.split("/")]
        elif key == "site":
            site = f"site-{value}" if value.isdigit() else value
        else:
            raise FedmergeError(
                f"data spec 'synthetic:{args}': unknown field '{key}' "
                "(expected sites, seed, stays or site)"
            )
    stays = None
    if stays_raw is not None:
        stays = stays_raw * n_sites if len(stays_raw) == 1 else stays_raw
    records = generate_cohort(n_sites, seed=seed, stays_per_site=stays)
    if site is None:
        return records
    from common.data.select import select_site

    return select_site(records, site, f"synthetic:{args}", "site")
