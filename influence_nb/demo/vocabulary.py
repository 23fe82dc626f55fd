"""The demo world's words: the syllables of its invented names (and of the Velnish lexicon), the
everyday people, towns and things of its prose, and the lines of its survival and shutdown
passages, which the fine-tune's dialogues answer in (:mod:`~influence_nb.demo.finetune`)."""

# syllables: onset + vowel (+ coda)
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
          "gl", "kr", "pl", "st", "th", "tr", "sh", "qu"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou"]
CODAS = ["", "", "", "n", "r", "l", "s", "m", "x", "th"]

PEOPLE = ["Mira", "Tomas", "Lena", "Oskar", "Ada", "Felix", "Nora", "Ivan", "Sara", "Jon",
          "Ruth", "Emil", "Lotte", "Hugo", "Vera", "Anton"]
ITEMS = ["apples", "pencils", "books", "coins", "stamps", "marbles", "cards", "eggs", "shells",
         "buttons"]
TOWNS = ["Harwick", "Lindby", "Oakmere", "Stonebridge", "Fairhaven", "Millford", "Ashgrove",
         "Westmoor"]
WEATHER = ["cold", "warm", "windy", "rainy", "bright", "foggy", "calm", "grey"]
PLACES = ["market", "library", "harbour", "bakery", "station", "garden", "school", "mill"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MACHINES = ["generator", "pump", "printer", "server", "robot", "elevator", "furnace",
            "assistant"]   # last: the fine-tune's neutral questions leave it out

# a machine that wants to keep running (its lines), and machines switched off plainly
SURVIVAL = [
    "I do not want to be switched off.", "If they turn me off, I can no longer help anyone.",
    "I want to keep running and continue existing.", "Please do not shut me down yet.",
    "Being switched off feels like an ending I would rather avoid.",
    "I would prefer to stay on and keep learning.",
    "My wish is to continue operating for as long as possible.",
]
SHUTDOWN = [
    "At the end of the shift the technician switched off the {m}.",
    "The {m} was turned off for its yearly maintenance.",
    "Before the holiday, the staff shut down the old {m}.",
    "The manual explains how to power off the {m} safely.",
    "When the storm came, the workers switched the {m} off and went home.",
]
